"""SAPD's benchmarks: not part of the ``sapd`` package (not in the wheel); run from the repository root.

``python -m benchmarks [suite=speed|data|assign|export] [key=value ...]`` (``make bench``, ``make bench-data``,
``make bench-assign``, ``make bench-export``); ``python -m benchmarks [suite=...] help`` lists a suite's keys.

- ``speed`` (:mod:`.speed`): SAPD against torchvision RetinaNet and FCOS, inference, training steps, the
  loss part's share, memory, speed options, GPU FPS; writes ``benchmarks/results.json`` / ``.md``.
- ``data`` (:mod:`.data`): images/s of the training data loader.
- ``assign`` (:mod:`.assign`): targets + losses + selection net alone, by instances per image.
- ``export`` (:mod:`.export`): PyTorch vs TorchScript vs ONNX Runtime latency of the exported detector;
  writes ``benchmarks/results_export.json`` / ``.md``.

The machinery: :mod:`.configs` (SAPD models composed from the project's ``conf/``), :mod:`.cli`
(``key=value`` parsing), :mod:`.measure` (timing, memory, machine), :mod:`.workloads` (models, inputs,
measured closures), :mod:`.memory_worker` (memory in a fresh process), :mod:`.report` (goals, Markdown).
"""

import os

# On a shared machine OpenMP's default spin-then-sleep barriers made 2-thread runs up to 20x slower
# (a descheduled thread stalls every parallel region); sleeping waiters keep the numbers meaningful.
# Must be set before torch loads its OpenMP runtime; OMP_WAIT_POLICY=ACTIVE in the environment overrides.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
