"""Nothing a user made is overwritten: export refuses its own checkpoint as output and writes whole
files, a run folder holds one run, predict never replaces a file, Ctrl-C saves last.ckpt, and the
temporary files of a killed save are removed by the next one."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_config
from sapd import export as sapd_export
from sapd.atomic import WriteError, remove_stale_temporaries, temporary_path, write_text
from sapd.checkpoint_io import AtomicCheckpointIO
from sapd.paths import initialize_configs
from sapd.predict import PredictError, predict
from sapd.run_folder import LOCK_FILE, RunFolderError, claim_run_folder
from sapd.train import main as train_main
from sapd.train import train

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _export_config(*overrides: str):
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_configs():
        return compose("export", overrides=list(overrides))


@pytest.fixture(scope="module")
def trained(tiny_checkpoint):
    return tiny_checkpoint


# ----------------------------------------------------------------------------- export


def test_export_refuses_an_output_that_is_its_checkpoint(tmp_path, caplog):
    ckpt = tmp_path / "c.ckpt"
    ckpt.write_bytes(b"PK training checkpoint")  # refused before it is read
    (tmp_path / "sub").mkdir()
    alias = tmp_path / "alias.ckpt"
    alias.symlink_to(ckpt)
    for output in (ckpt, tmp_path / "sub" / ".." / "c.ckpt", alias, tmp_path / "c"):  # "c" + ".json" is not it
        caplog.clear()
        if output.name == "c":
            (tmp_path / "c.json").write_bytes(b"x")
            ckpt_arg = tmp_path / "c.json"
        else:
            ckpt_arg = ckpt
        with pytest.raises(SystemExit) as exit_info:
            sapd_export.main(_export_config(f"ckpt_path={ckpt_arg}", f"output={output}", "format=torchscript"))
        assert exit_info.value.code == 2
        (line,) = _errors(caplog)
        assert line.startswith("sapd.export: output=") and "would replace the checkpoint" in line
    assert ckpt.read_bytes() == b"PK training checkpoint"


@pytest.mark.slow
def test_a_failed_re_export_leaves_the_old_file_whole(trained, tmp_path):
    """A write cut short (a file-size limit: EFBIG, as a full disk gives ENOSPC) is one line with exit
    status 2, and the previous export and its JSON stay as they were, no temporary file left."""
    ckpt, _ = trained
    output = tmp_path / "m.torchscript.pt"
    output.write_bytes(b"the previous export")
    stale = temporary_path(output).with_name(f".{output.name}.tmp-{_dead_pid()}")  # a killed export's
    stale.write_bytes(b"half")

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # 1 MiB: less than the model

    argv = [sys.executable, "-m", "sapd.export", f"ckpt_path={ckpt}", "format=torchscript", f"output={output}"]
    proc = subprocess.run(argv, env=_env(), capture_output=True, text=True, preexec_fn=limit, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "sapd.export:" in ln]
    assert len(errors) == 1 and f"cannot write {output}" in errors[0] and "Traceback" not in proc.stderr
    assert output.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == [output.name]  # the stale temporary file removed too


def test_stale_temporary_checkpoints_are_removed_at_the_next_save(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    dead = path.with_name(f".last.ckpt.tmp-{_dead_pid()}")
    dead.write_bytes(b"PK half a checkpoint")  # what a SIGKILL during a save leaves
    alive = path.with_name(f".last.ckpt.tmp-{os.getppid()}")  # another live process's save in progress
    alive.write_bytes(b"PK being written")
    other = path.with_name(f".epoch_001.ckpt.tmp-{_dead_pid()}")  # another file's: left to its own next save
    other.write_bytes(b"PK")
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert torch.load(path)["step"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(["last.ckpt", alive.name, other.name])
    assert remove_stale_temporaries(path.with_name("epoch_001.ckpt")) == [other]


def test_an_exclusive_write_never_replaces_a_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("theirs")
    with pytest.raises(WriteError, match="exists and is left as it is"):
        write_text(path, "ours", exclusive=True)
    assert path.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    write_text(tmp_path / "b.json", "ours", exclusive=True)
    assert (tmp_path / "b.json").read_text() == "ours"


# ----------------------------------------------------------------------------- run folders


def test_a_folder_holding_a_run_is_refused_unless_the_run_resumes_it(tmp_path, caplog):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(b"PK someone's run")
    with pytest.raises(RunFolderError, match="already holds a run"), claim_run_folder(run):
        pass
    with claim_run_folder(run, ckpt_path=last):  # resuming it
        pass
    # a checkpoint from elsewhere does not resume this folder
    with pytest.raises(RunFolderError), claim_run_folder(run, ckpt_path=tmp_path / "other.ckpt"):
        pass
    summary_only = tmp_path / "done"
    summary_only.mkdir()
    (summary_only / "summary.json").write_text("{}")
    # the command: one line, exit status 2, before any data is read
    cfg = compose_config("train", TINY, summary_only)
    with pytest.raises(SystemExit) as exit_info:
        train_main(cfg)
    assert exit_info.value.code == 2
    (line,) = _errors(caplog)
    assert line.startswith(f"sapd.train: run folder {summary_only} already holds a run (summary.json)")
    assert (summary_only / "summary.json").read_text() == "{}"


def test_a_folder_in_use_is_refused_and_a_dead_holder_does_not_block(tmp_path):
    run = tmp_path / "run"
    in_use = f"in use by another training \\(process {os.getpid()}\\)"
    with claim_run_folder(run), pytest.raises(RunFolderError, match=in_use), claim_run_folder(run):
        pass
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sapd.run_folder import claim_run_folder\n"
         "with claim_run_folder(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)", str(run)],
        env=_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunFolderError, match=f"process {holder.pid}"), claim_run_folder(run):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    with claim_run_folder(run):  # the kernel released the dead process's lock
        assert (run / LOCK_FILE).read_text().strip() == str(os.getpid())


@pytest.mark.slow
def test_two_trainings_raced_into_one_folder_one_trains_one_is_refused(tmp_path):
    run = tmp_path / "run"
    overrides = [*TINY, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    overrides += ["validate_best=false", "report.enabled=false", f"hydra.run.dir={run}"]
    argv = [sys.executable, "-m", "sapd.train", *overrides]
    procs = [subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    procs.append(subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], [err[-2000:] for _, err in outs]
    refused = "".join(outs[codes.index(2)])  # Hydra's console log is on stdout
    lines = [ln for ln in refused.splitlines() if "sapd.train:" in ln]
    assert len(lines) == 1 and f"run folder {run}" in lines[0] and "Traceback" not in refused
    assert ("in use by another training" in lines[0]) or ("already holds a run" in lines[0])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 2
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


@pytest.mark.slow
def test_the_run_folder_check_lets_resumed_runs_in(train_cfg, tmp_path):
    """A run resumed from its own folder's checkpoint trains on there (train(cfg), in process)."""
    first = train_cfg("trainer.max_epochs=1", "trainer.limit_train_batches=1", "validate_best=false")
    first.report.enabled = False
    train(first)
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(RunFolderError):
        train(train_cfg("trainer.max_epochs=2", "trainer.limit_train_batches=1", "validate_best=false"))
    again = train_cfg(
        "trainer.max_epochs=2", "trainer.limit_train_batches=1", "validate_best=false", f"ckpt_path={last}"
    )
    again.report.enabled = False
    train(again)
    assert torch.load(last, weights_only=False)["global_step"] == 2


# ----------------------------------------------------------------------------- Ctrl-C

INTERRUPTED = [
    *TINY,
    "data.batch_size=1",
    "trainer.max_epochs=50",
    "validate_best=false",
    "report.enabled=false",
    "callbacks.last_checkpoint=null",  # checkpoints/last.ckpt can only come from the interrupt
    "callbacks.step_checkpoint.train_time_interval=null",
    "callbacks.step_checkpoint.every_n_train_steps=1",
    "callbacks.step_checkpoint.filename=first_step",  # a file that says the first step is done
]


@pytest.mark.slow
def test_ctrl_c_saves_last_ckpt_says_so_and_exits_130(tmp_path):
    run = tmp_path / "run"
    probe = tmp_path / "probe"
    argv = [
        sys.executable,
        "-m",
        "sapd.train",
        *INTERRUPTED,
        f"callbacks.step_checkpoint.dirpath={probe}",
        f"hydra.run.dir={run}",
    ]
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (probe / "first_step.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    err = out + err  # Hydra's console log is on stdout
    assert proc.returncode == 130, err[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    lines = [ln for ln in err.splitlines() if "sapd.train:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    state = torch.load(last, map_location="cpu", weights_only=False)
    step = state["global_step"]
    assert step > 0 and lines[0].endswith(
        f"sapd.train: interrupted at step {step}; saved {last}; resume with ckpt_path={last}"
    )
    assert not list(last.parent.glob(".last.ckpt.tmp-*"))
    # the command it names resumes into the same folder and ends the epoch (16 images of batch 1 each)
    epochs = step // 16 + 1
    resume = [o for o in argv if not o.startswith(("trainer.max_epochs=", "callbacks.last_checkpoint="))]
    resume += [f"trainer.max_epochs={epochs}", f"ckpt_path={last}"]
    done = subprocess.run(resume, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 16 * epochs


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(tmp_path):
    """The first Ctrl-C waits for the batch to end; a second one, while it waits, ends the process."""
    script = textwrap.dedent(
        """
        import os, signal, sys, time
        import lightning as L
        from conftest import TINY, compose_config, train_with

        class Slow(L.Callback):  # a long batch: the first Ctrl-C is still waiting when the second comes
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if trainer.global_step == 1:
                    print("slow batch", flush=True)
                    time.sleep(120)

        overrides = [*TINY, "trainer.max_epochs=5", "validate_best=false", "report.enabled=false"]
        train_with(compose_config("train", overrides, sys.argv[1]), Slow())
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:  # the model summary comes first
        if line.strip() == "slow batch":
            break
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - start < 60, (out + err)[-3000:]
    assert "sapd.train: interrupted again: stopped at once, without saving" in err
    assert (
        not (tmp_path / "checkpoints" / "last.ckpt").exists()
        or torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] <= 1
    )


# ----------------------------------------------------------------------------- predict


def _predict_config(ckpt: Path, image: Path, out: Path, run: Path):
    return compose_config("predict", [f"ckpt_path={ckpt}", f"input={image}", f"output={out}"], run)


@pytest.mark.slow
def test_predict_never_replaces_a_file(trained, tmp_path, caplog):
    ckpt, datamodule = trained
    folder = tmp_path / "photos"
    folder.mkdir()
    image = folder / "cat.jpg"
    image.write_bytes(next(Path(datamodule.val_dataset.img_dir).glob("*.jpg")).read_bytes())
    unrelated = folder / "cat.jpg.json"  # a user's file that happens to bear the output's name
    unrelated.write_text("the user's notes")
    with pytest.raises(PredictError, match=r"already holds .*cat\.jpg\.json: predict never replaces a file"):
        predict(_predict_config(ckpt, image, folder, tmp_path))  # a single file whose output is its own folder
    assert unrelated.read_text() == "the user's notes" and not (folder / "cat.jpg.png").exists()
    out = tmp_path / "pred"
    predict(_predict_config(ckpt, image, out, tmp_path))
    first = (out / "cat.jpg.json").read_bytes()
    with pytest.raises(PredictError, match="already holds"):  # a second run into the same folder
        predict(_predict_config(ckpt, image, out, tmp_path))
    assert (out / "cat.jpg.json").read_bytes() == first
    assert sorted(p.name for p in out.iterdir()) == ["cat.jpg.json", "cat.jpg.png"]


PREDICT_FULL = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    from conftest import compose_config
    from sapd.predict import predict
    ckpt, image, out, run = sys.argv[1:5]
    cfg = compose_config("predict", [f"ckpt_path={ckpt}", f"input={image}", f"output={out}"], Path(run))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))  # a disk that fills up after 16 bytes of each file
    try:
        predict(cfg)
    except Exception as exc:
        print(type(exc).__name__, str(exc).replace(chr(10), " "))
    print("lightning imported:", "lightning" in sys.modules)  # the checkpoint was read without it
    """
)


@pytest.mark.slow
def test_predict_on_a_full_disk_leaves_no_empty_or_cut_file(trained, tmp_path):
    ckpt, datamodule = trained
    image = next(Path(datamodule.val_dataset.img_dir).glob("*.jpg"))
    out = tmp_path / "pred"
    argv = [sys.executable, "-c", PREDICT_FULL, str(ckpt), str(image), str(out), str(tmp_path)]
    proc = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"WriteError cannot write {out / image.name}.json: "), proc.stdout
    assert not out.exists() or list(out.iterdir()) == []
    assert proc.stdout.splitlines()[-1] == "lightning imported: False"
