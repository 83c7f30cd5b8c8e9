"""Refusals are one line and nothing is lost: start-up config checks, broken checkpoints, atomic
checkpoint saves (killed mid-save), unique and writable run folders, the stored phase switch."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from sapd.callbacks import PhaseSwitch
from sapd.checkpoint import CheckpointError, check_checkpoint_file, read_checkpoint
from sapd.checkpoint_io import AtomicCheckpointIO
from sapd.checks import check_config
from sapd.errors import ConfigError, UserError, one_line, refusals
from sapd.paths import writable_dir
from sapd.train import main as train_main

ROOT = Path(__file__).parents[1]


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# ----------------------------------------------------------------------------- start-up config checks


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.criterion.topk=0", "model.criterion.topk must be an integer >= 1; got 0"),
        ("model.criterion.topk=9", "model.criterion.topk=9 exceeds the 5 pyramid levels: choose 1 to 5"),
        ("model.criterion.eta=-1", "model.criterion.eta must be a finite number >= 0; got -1"),
        ("model.criterion.epsilon=0", "model.criterion.epsilon must be a finite number in (0, 1]; got 0"),
        ("model.criterion.epsilon=1.5", "model.criterion.epsilon must be a finite number in (0, 1]; got 1.5"),
        ("model.postprocess.nms_thresh=0", "model.postprocess.nms_thresh must be a finite number in (0, 1]"),
        ("data.batch_size=0", "data.batch_size must be an integer >= 1; got 0"),
        ("data.val_batch_size=-2", "data.val_batch_size must be an integer >= 1"),
        ("data.num_workers=-1", "data.num_workers must be an integer >= 0"),
        ("trainer.max_epochs=0", "trainer.max_epochs must be an integer >= 1"),
    ],
)
def test_config_is_checked_before_anything_is_built(tmp_path, override, message):
    cfg = compose_config("train", [override], tmp_path)
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_default_and_every_experiment_pass_the_checks(tmp_path, monkeypatch):
    # as on a machine with 8 GPUs: the COCO experiments train on GPUs (trainer=gpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    for name in [None, *sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))]:
        check_config(compose_config("train", [f"experiment={name}"] if name else [], tmp_path))


def test_train_refuses_in_one_line_before_reading_data(tmp_path, caplog, monkeypatch):
    """The refusal comes before the data module exists: a data root that does not exist is never read."""
    cfg = compose_config(
        "train", ["model.criterion.topk=0", "data=coco", f"data.root={tmp_path / 'no-coco'}"], tmp_path
    )
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        train_main(cfg)
    assert exit_info.value.code == 2
    assert _errors(caplog) == ["sapd.train: model.criterion.topk must be an integer >= 1; got 0"]
    assert not (tmp_path / "checkpoints").exists()


def test_full_error_keeps_the_traceback(tmp_path, monkeypatch):
    cfg = compose_config("train", ["data.batch_size=0"], tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError, match="data.batch_size"):
        train_main(cfg)


def test_bugs_keep_their_traceback_and_user_errors_inside_wrappers_are_found(caplog):
    @refusals("sapd.test")
    def buggy():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        buggy()

    @refusals("sapd.test")
    def wrapped():  # what Hydra's instantiate does to a constructor's error
        try:
            raise UserError("data.root=/x is not a folder")
        except UserError as exc:
            raise RuntimeError("Error in call to target 'X'") from exc

    with pytest.raises(SystemExit):
        wrapped()
    assert _errors(caplog) == ["sapd.test: data.root=/x is not a folder"]


def test_an_error_from_a_dataloader_worker_is_one_line():
    exc = UserError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 3, in f\n    raise DataError(msg)\n'
        "sapd.data.DataError: cannot read image /data/a.jpg: truncated file\n"
    )
    assert one_line(exc) == "cannot read image /data/a.jpg: truncated file"


# ----------------------------------------------------------------------------- checkpoints


def test_broken_checkpoints_are_named_with_what_to_do(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    good = folder / "epoch_001.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, good)
    empty = folder / "last.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"last.ckpt is empty \(0 bytes\).*interrupted.*epoch_001.ckpt"):
        check_checkpoint_file(empty)
    truncated = folder / "cut.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut.ckpt \(\d+ bytes\) is truncated or not a torch checkpoint"):
        read_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        check_checkpoint_file(folder / "nope.ckpt")
    assert check_checkpoint_file(good) == good


def test_resume_from_an_empty_checkpoint_is_one_line(tmp_path, caplog, monkeypatch):
    empty = tmp_path / "last.ckpt"
    empty.write_bytes(b"")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cfg = compose_config("train", [f"ckpt_path={empty}", "data=coco", f"data.root={tmp_path / 'no-coco'}"], tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train_main(cfg)
    assert exit_info.value.code == 2
    (line,) = _errors(caplog)
    assert line.startswith("sapd.train: checkpoint ") and "is empty (0 bytes)" in line


def test_atomic_save_keeps_the_old_file_when_a_save_fails(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(10)}, path)
    assert torch.load(path)["step"] == 1

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # a kill during the write

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.ones(10)}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left


SAVER = textwrap.dedent(
    """
    import os, sys, torch
    from sapd.checkpoint_io import AtomicCheckpointIO
    path = sys.argv[1]
    for _ in sys.stdin:  # a fresh saving process per line, forked: torch and sapd are imported once
        pid = os.fork()
        if pid == 0:
            io, state = AtomicCheckpointIO(), {"w": torch.randn(4_000_000)}  # 16 MB: a save takes a while
            step = 0
            while True:
                step += 1
                state["step"] = step
                io.save_checkpoint(state, path)
        print(pid, flush=True)
        os.waitpid(pid, 0)  # until the test kills it
        print("reaped", flush=True)
    """
)


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_broken_checkpoint():
    """A process saving over ``last.ckpt`` in a loop is SIGKILLed at several moments: the file always
    loads. The destination is on a tmpfs (/dev/shm) when there is one, the system temporary folder on
    the disk: the case where Lightning's own save (a temporary file in /tmp, then a move) is a copy."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
    import tempfile

    with tempfile.TemporaryDirectory(dir=base) as folder:
        path = Path(folder) / "last.ckpt"
        host = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        steps = []
        try:
            for delay in (0.05, 0.2, 0.45, 0.8):
                host.stdin.write("save\n")
                host.stdin.flush()
                saver = int(host.stdout.readline())
                deadline = time.time() + 60
                while not path.exists() and time.time() < deadline:
                    time.sleep(0.01)
                time.sleep(delay)
                os.kill(saver, signal.SIGKILL)
                assert host.stdout.readline().strip() == "reaped"
                steps.append(torch.load(path, weights_only=False)["step"])  # whole, whatever the moment
        finally:
            host.stdin.close()
            assert host.wait(timeout=60) == 0
        assert all(s >= 1 for s in steps)


# ----------------------------------------------------------------------------- run folders


def test_run_folders_carry_the_process_id(tmp_path):
    cfg = compose_config("train", [], tmp_path)
    run_dir = OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"]
    assert run_dir.endswith(f"_{os.getpid()}")
    sweep_dir = OmegaConf.to_container(cfg.hydra.sweep, resolve=True)["dir"]
    assert sweep_dir.endswith(f"_{os.getpid()}")


RUN_DIR = textwrap.dedent(
    """
    import sys, time
    from hydra import compose
    from omegaconf import OmegaConf
    from sapd.paths import initialize_configs
    with initialize_configs():
        cfg = compose(config_name="train", overrides=[f"paths.log_dir={sys.argv[1]}"], return_hydra_config=True)
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    while time.time() < start:  # both resolve the folder in the same second
        time.sleep(0.001)
    print(OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"])
    """
)


@pytest.mark.slow
def test_two_runs_started_in_the_same_second_get_two_folders(tmp_path):
    argv = [sys.executable, "-c", RUN_DIR, str(tmp_path)]
    procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]  # both composed their config
    start = f"{int(time.time()) + 1.2}\n"  # 0.2 s into a second, at least 0.2 s from now
    for p in procs:
        p.stdin.write(start)
        p.stdin.flush()
    dirs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(d.startswith(str(tmp_path / "train" / "runs")) for d in dirs)
    assert dirs[0] != dirs[1]


def test_an_unwritable_log_folder_is_one_line(tmp_path, capsys):
    assert writable_dir(str(tmp_path / "new" / "logs")) == str(tmp_path / "new" / "logs")
    assert (tmp_path / "new" / "logs").is_dir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [(str(a_file / "logs"), "is a file, not a folder")]
    if Path("/proc").is_dir():
        cases.append(("/proc/sapd-test-logs", "does not accept new folders"))
    for folder, why in cases:
        with pytest.raises(SystemExit) as exit_info:
            writable_dir(folder)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"sapd: cannot write the log folder {folder}") and why in err[0]
        assert "paths.log_dir" in err[0]


# ----------------------------------------------------------------------------- phase switch on resume


def test_a_longer_resumed_run_keeps_the_stored_switch_epoch(caplog):
    """The callback's state travels in the checkpoint (test_resume checks Lightning saves and restores it)."""
    first = PhaseSwitch()
    first.resolved_switch_epoch(SimpleNamespace(max_epochs=2))  # switch at 1 (half of 2)
    stored = first.state_dict()
    assert stored == {"switch_epoch": 1}
    # 6 epochs would put the switch at 3 and send epoch 2 back to phase 1; the run keeps 1, and says so once
    resumed = PhaseSwitch()
    resumed.load_state_dict(stored)
    longer = SimpleNamespace(max_epochs=6)
    with caplog.at_level(logging.INFO, logger="sapd.callbacks"):
        assert [resumed.phase_for_epoch(longer, epoch) for epoch in range(2, 6)] == [2, 2, 2, 2]
    assert caplog.text.count("phase 2 still starts at epoch 1 as stored with the run") == 1
    assert resumed.state_dict() == stored  # and stored again with the resumed run's checkpoints
    # an explicit value wins, with one warning
    caplog.clear()
    explicit = PhaseSwitch(switch_epoch=3)
    explicit.load_state_dict(stored)
    with caplog.at_level(logging.INFO, logger="sapd.callbacks"):
        assert [explicit.phase_for_epoch(SimpleNamespace(max_epochs=4), epoch) for epoch in (2, 3)] == [1, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "phase switch epoch changed on resume: 3" in warnings[0]
    assert "the 1 stored" in warnings[0] and explicit.state_dict() == {"switch_epoch": 3}
    # a resumed run whose half is the stored epoch says nothing
    caplog.clear()
    same = PhaseSwitch()
    same.load_state_dict(stored)
    with caplog.at_level(logging.INFO, logger="sapd.callbacks"):
        assert same.phase_for_epoch(SimpleNamespace(max_epochs=2), 1) == 2
    assert caplog.records == []


def test_every_row_of_the_bad_input_table_names_existing_tests():
    text = (ROOT / "docs" / "robustness.md").read_text()
    table = text.split("## Bad input: what happens", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| input")]
    assert len(rows) >= 25
    for row in rows:
        names = [n.strip("` ") for n in row.rstrip(" |").rsplit("|", 1)[1].split(",")]
        assert names and all("::" in n for n in names), row
        for name in names:
            module, test = name.split("::")
            source = (ROOT / "tests" / f"{module}.py").read_text()
            assert f"def {test}(" in source, f"{name} (docs/robustness.md bad-input table) is not a test"
