"""Shared fixtures: the real Hydra configs, composed once, shrunk to seconds on a CPU."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# Threads: OMP_NUM_THREADS where the user set it; else the cores shared out among pytest-xdist's workers
# (make test runs one worker per core), at most 2. The processes a test starts inherit the same count.
# More OpenMP threads than free cores spin: a training step of the default model took up to 7.6 s instead
# of 0.1 s with 2 threads beside another busy process on 2 cores (docs/benchmarks.md). SAPD_TEST_THREADS
# marks a count set here, so that xdist's workers, which inherit the controller's environment, set their own.
_SHARED = "SAPD_TEST_THREADS"


def pytest_configure(config):
    if not os.environ.get("OMP_NUM_THREADS") or os.environ.get(_SHARED) == "shared":  # not the user's count
        workerinput = getattr(config, "workerinput", None)  # set in pytest-xdist's workers
        workers = int(workerinput["workercount"]) if workerinput is not None else 1
        os.environ[_SHARED] = "shared"
        os.environ["OMP_NUM_THREADS"] = str(max(1, min(2, (os.cpu_count() or 1) // workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


from sapd.app import quick_exit  # noqa: E402
from sapd.paths import initialize_configs  # noqa: E402

quick_exit()  # pytest's processes, and the scripts the tests start that import this file, exit without teardown

# The files that train or start processes, heaviest first (test durations of `make test`, 2 cores,
# 2026-12-05): pytest-xdist hands out whole files in collection order, so these go first and the
# light files fill in behind them, instead of a long file starting last while the other processes idle.
HEAVY_FIRST = (
    "tests/test_bench.py",
    "tests/test_overwrite.py",
    "tests/test_ddp.py",
    "tests/test_export.py",
    "tests/test_rehearse.py",
    "tests/test_resume.py",
    "tests/test_evaluate_predict.py",
    "tests/test_refusals.py",
    "tests/test_logging.py",
    "tests/test_train.py",
    "notebooks/quickstart.ipynb",
    "tests/test_packaging.py",
    "tests/test_checks.py",
    "tests/test_learning_check.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(HEAVY_FIRST)))  # stable: order within kept


# A tiny but complete run: small synthetic set, small images, a slim network, CPU, no logger.
# The selection net keeps the model's width: some experiments have none (model.selection=null) to shrink.
TINY = [
    "data.synthetic.num_train=16",
    "data.synthetic.num_val=8",
    "data.synthetic.min_side=96",
    "data.synthetic.max_side=160",
    "data.synthetic.max_objects=6",
    "data.min_size=128",
    "data.max_size=192",
    "data.val_min_size=null",
    "data.val_max_size=null",
    "data.batch_size=4",
    "data.val_batch_size=4",
    "data.num_workers=0",
    # timm's network for tests, with C3-C5: 8 steps and 2 evaluations in 2.4 s, 4.7 s with resnet10t; its ONNX
    # export takes 13.5 s, 21.6 s with lcnet_050 (docs/benchmarks.md)
    "model.backbone.name=test_resnet",
    "model.backbone.pretrained=false",
    "model.neck.out_channels=16",
    "model.head.feat_channels=16",
    "model.head.num_convs=1",
    "model.head.norm=gn",
    "logger=none",
    "trainer=cpu",
    "trainer.precision=32-true",
    "callbacks.progress_bar=null",
    "callbacks.detection_images=null",
]

# What turns a COCO experiment into the tiny synthetic run above.
TO_SYNTHETIC = ["data=synthetic", "model.backbone.frozen_stages=-1", "model.backbone.norm_eval=false"]


@contextlib.contextmanager
def _session_env(name: str, value: str) -> Iterator[None]:
    """Sets the environment variable ``name`` for the session (and the processes its tests start)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory) -> Path:
    """Synthetic sets are drawn into a session folder, never into the user's cache."""
    path = tmp_path_factory.mktemp("sapd-data")
    with _session_env("SAPD_DATA_DIR", str(path)):
        yield path


@pytest.fixture(scope="session", autouse=True)
def _temporary_files(tmp_path_factory) -> Iterator[None]:
    """The processes the tests start keep their temporary files (wandb's media and artifact folders, the
    checkpoint writers') in the session folder, which pytest rotates: a process a test kills cannot
    remove its own, and they would pile up in the system's temporary folder."""
    with _session_env("TMPDIR", str(tmp_path_factory.mktemp("tmp"))):
        yield


def compose_config(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """The real config ``name`` with ``overrides``, its Hydra runtime set as a run would."""
    GlobalHydra.instance().clear()
    with initialize_configs():
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def train_cfg(tmp_path):
    """A factory: ``train_cfg(*overrides)`` -> the tiny training config plus ``overrides``."""

    def make(*overrides: str) -> DictConfig:
        return compose_config("train", [*TINY, *overrides], tmp_path)

    return make


def train_tiny_checkpoint(output_dir: Path, *overrides: str) -> tuple[Path, object]:
    """Trains the tiny model 3 steps on the synthetic set into ``output_dir``: (last.ckpt, datamodule)."""
    from sapd.train import train

    cfg = compose_config(
        "train",
        [*TINY, "trainer.max_epochs=1", "trainer.limit_train_batches=3", "validate_best=false", *overrides],
        output_dir,
    )
    _, objects = train(cfg)
    ckpt = Path(output_dir) / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt, objects["datamodule"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, object]:
    """The one checkpoint of ``train_tiny_checkpoint`` that every test needing a trained model shares:
    (last.ckpt, its data module). Its scores sit near the 0.01 prior. Read-only: a test that writes next
    to it or changes it works on a copy."""
    return train_tiny_checkpoint(tmp_path_factory.mktemp("tiny-run"))


def train_with(cfg, *extra_callbacks):
    """``train(cfg)`` with extra callbacks appended to the configured ones."""
    import sapd.train as train_module

    original = train_module.instantiate_group

    def with_extra(group_cfg):
        objects = original(group_cfg)
        return objects + list(extra_callbacks) if group_cfg is cfg.get("callbacks") else objects

    train_module.instantiate_group = with_extra
    try:
        return train_module.train(cfg)
    finally:
        train_module.instantiate_group = original


# Commands run as `python -m <module> <args>` runs them (Hydra parses the command line), several in one
# process so that sapd is imported once; run i's console (stdout and stderr) goes to $OUT/<i>.out.
COMMANDS = textwrap.dedent(
    """
    import importlib, json, os, sys
    from hydra.core.global_hydra import GlobalHydra
    results = []
    for module, args, env in json.loads(sys.argv[1]):
        GlobalHydra.instance().clear()
        os.environ.pop("SAPD_CONFIG_DIR", None)
        os.environ.update(env)
        sys.argv = [module, *args]
        sys.stdout.flush()
        sys.stderr.flush()
        out = os.open(os.path.join(os.environ["OUT"], f"{len(results)}.out"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        saved = os.dup(1), os.dup(2)
        os.dup2(out, 1)  # the console: a run's log lines go to stdout (Hydra's job logging), Hydra's to stderr
        os.dup2(out, 2)
        try:
            importlib.import_module(module).main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(out)
        results.append(code)
    print(json.dumps(results))
    """
)


def run_commands(runs: list, out: Path, **env: str) -> list:
    """Runs each ``(module, args, env)`` of ``runs`` in one new process (:data:`COMMANDS`); returns
    their exit codes; the console of run ``i`` is in ``out / f"{i}.out"``."""
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-c", COMMANDS, json.dumps(runs)]
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "OUT": str(out), **env}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
