"""``python -m benchmarks [suite=speed|data|assign|export|train|rehearse|memory|coco_eval] [key=value ...]``.

``suite`` picks the benchmark (default ``speed``); every other ``key=value`` goes to that suite
(``python -m benchmarks suite=data help`` lists its keys).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from importlib import import_module

SUITES = {
    "speed": "SAPD vs torchvision RetinaNet and FCOS: inference, training, loss part, memory (writes results.*)",
    "data": "images/s of the training data loader (synthetic set, 800-px images)",
    "assign": "targets + losses + selection net alone, forward + backward, by instances per image",
    "export": "PyTorch vs TorchScript vs ONNX Runtime latency of the exported model (writes results_export.*)",
    "train": "s/step of the CPU training recipe: SAPD (model=tiny) phase 1 and 2 against FCOS (model=fcos)",
    "rehearse": "experiment=r50 shrunk, 2 gloo processes, a drawn COCO-quirk set, killed and resumed (rehearsal.json)",
    "memory": "host memory of the COCO loader on a drawn COCO-sized file: parsing, and with loader workers",
    "coco_eval": "hotcoco, faster-coco-eval, pycocotools: seconds to score COCO scale, agreement of the 12 stats",
}


def suite_main(name: str) -> Callable[[list[str]], object]:
    """The ``main(argv)`` of suite ``name`` (:mod:`benchmarks.<name>`)."""
    if name not in SUITES:
        raise SystemExit(f"python -m benchmarks: error: unknown suite {name!r}; choose one of {', '.join(SUITES)}")
    return import_module(f"{__package__ or 'benchmarks'}.{name}").main


def main(argv: Sequence[str] | None = None) -> object:
    argv = list(sys.argv[1:] if argv is None else argv)
    suites = [a.split("=", 1)[1] for a in argv if a.startswith("suite=")]
    rest = [a for a in argv if not a.startswith("suite=")]
    if not suites and any(a in ("-h", "--help", "help") for a in rest):
        print(__doc__.strip().splitlines()[0] + "\n\nsuites:")
        for name, text in SUITES.items():
            print(f"  suite={name:7s} {text}")
        print("\n`python -m benchmarks suite=<name> help` lists the keys of one suite.")
        return None
    return suite_main(suites[-1] if suites else "speed")(rest)


if __name__ == "__main__":
    from sapd.app import quick_exit

    quick_exit()
    main()
