"""Exact resume: a run killed with SIGKILL in the middle of an epoch and restarted from its last.ckpt
ends with the weights, optimiser state, step and data order of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sapd.data.samplers import EpochRandomSampler, TrainBatchSampler, mix_seed

TESTS = Path(__file__).resolve().parent

# One process per run (the killed one must die for real): the tiny config of conftest.py, 3 epochs of
# 4 batches (phase 2 from epoch 1), last.ckpt after every step, every batch's image ids and sizes logged.
RUN = r"""
import json, os, signal, sys
from pathlib import Path
import lightning as L
sys.path.insert(0, {tests!r})
from conftest import TINY, compose_config, train_with
from sapd.callbacks import PhaseSwitch

out, kill_at, ckpt, workers = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] or None, int(sys.argv[4])

class Record(L.Callback):
    def on_train_start(self, trainer, module):  # the switch epoch the run read from its checkpoint, if any
        (switch,) = [c for c in trainer.callbacks if isinstance(c, PhaseSwitch)]
        (out / "stored_switch.json").write_text(json.dumps(switch.stored_switch_epoch))

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == kill_at:  # last.ckpt of the step before is whole: killed mid-epoch
            os.kill(os.getpid(), signal.SIGKILL)
        images, targets = batch
        with open(out / "batches.jsonl", "a") as f:
            row = {{"step": trainer.global_step, "epoch": trainer.current_epoch,
                   "ids": [t["image_id"] for t in targets], "size": list(images.shape[-2:]),
                   "lr": trainer.optimizers[0].param_groups[0]["lr"],
                   "phase": int(module.net.phase)}}
            f.write(json.dumps(row) + "\n")

overrides = [*TINY, "data.min_size=[96,160]", "trainer.max_epochs=3", "validate_best=false", "seed=3",
             "callbacks.step_checkpoint.train_time_interval=null", "callbacks.step_checkpoint.every_n_train_steps=1",
             f"data.num_workers={{workers}}"]
if ckpt:
    overrides.append(f"ckpt_path={{ckpt}}")
train_with(compose_config("train", overrides, out), Record())
"""


def run(out: Path, workers: int, kill_at: int = -1, ckpt: str = "") -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    script = RUN.format(tests=str(TESTS))
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    argv = [sys.executable, "-c", script, str(out), str(kill_at), ckpt, str(workers)]
    return subprocess.run(argv, env=env, capture_output=True, text=True)


def batches(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # three training processes, ~35 s
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    """With loader workers, the harder case: a resumed loader draws its indices before Lightning sets the
    epoch (without workers the same position comes from the data module's state, tested below)."""
    workers = 2
    full = run(tmp_path / "full", workers)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run(tmp_path / "killed", workers, kill_at=6)  # epoch 1 (steps 4-7), phase 2, 2 of its 4 batches done
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 6 and state["epoch"] == 1
    assert [int(v) for k, v in state["state_dict"].items() if k.endswith("phase")] == [2]
    assert {"switch_epoch": 1} in state["callbacks"].values()  # half of 3, stored with the run
    resumed = run(tmp_path / "resumed", workers, ckpt=str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    reference = batches(tmp_path / "full" / "batches.jsonl")
    assert len(reference) == 12
    assert [row["phase"] for row in reference] == [1] * 4 + [2] * 8  # phase 2 from epoch 1, half of 3
    # the resumed run took the switch epoch from the checkpoint (test_refusals: a longer run keeps it)
    assert json.loads((tmp_path / "resumed" / "stored_switch.json").read_text()) == 1
    assert json.loads((tmp_path / "full" / "stored_switch.json").read_text()) is None
    # the same images, at the same sizes, lr and phase, at every step: 0-5 before the kill, 6-11 after
    assert batches(tmp_path / "killed" / "batches.jsonl") + batches(tmp_path / "resumed" / "batches.jsonl") == reference
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 12
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert different == []  # bit-identical weights (and buffers: the phase, BN statistics)
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["lr_schedulers"] == b["lr_schedulers"]


def test_the_training_order_depends_on_seed_epoch_and_position_only():
    data = list(range(10))
    groups = [i % 2 for i in data]

    def epoch_batches(epoch, start_epoch=None, start_batch=0, seed=7):
        sampler = EpochRandomSampler(data, seed=seed)
        batch_sampler = TrainBatchSampler(sampler, 3, False, groups, seed, start_epoch, start_batch)
        sampler.set_epoch(epoch)  # as Lightning does at the start of each epoch
        return list(batch_sampler)

    first, again = epoch_batches(0), epoch_batches(0)
    assert first == again and first != epoch_batches(1) and first != epoch_batches(0, seed=8)
    assert sorted(i for b in first for i, _ in b) == data  # each image once per epoch
    assert all(len({groups[i] for i, _ in b}) == 1 for b in first[:2])  # a group's batches, then the rest
    assert all(s == mix_seed(7, 0, i) for b in first for i, s in b)  # the augmentation seed of each image
    assert epoch_batches(0, start_epoch=0, start_batch=2) == first[2:]  # a resumed epoch skips what was done
    assert epoch_batches(1, start_epoch=0, start_batch=2) == epoch_batches(1)  # only in its own epoch
    sampler = EpochRandomSampler(data, seed=7)
    once = TrainBatchSampler(sampler, 3, False, groups, 7, 0, 2)
    assert list(once) == first[2:] and list(once) == first  # the next pass over the epoch is whole
    assert len(once) == len(first)  # Lightning counts the epoch's full length


def test_the_resume_position_travels_in_the_checkpoint(train_cfg):
    from hydra.utils import instantiate

    dm = instantiate(train_cfg("data.seed=null", "seed=5").data)
    os.environ["PL_GLOBAL_SEED"] = "5"
    try:
        assert dm.train_seed == 5 and dm.state_dict()["train_seed"] == 5  # the run's global seed
    finally:
        os.environ.pop("PL_GLOBAL_SEED")
    dm.load_state_dict({"train_seed": 11, "train_position": {"epoch": 2, "batches": 3}, "skipped_images": {}})
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.batch_sampler.sampler.epoch == 2 and loader.batch_sampler.seed == 11
    assert len(list(loader.batch_sampler)) == len(loader) - 3
    assert len(list(dm.train_dataloader().batch_sampler)) == len(loader)  # only the first loader resumes
