"""Evaluation under DDP: every image scored once, one complete results json, the same AP as one process.

The fast tests check the pieces (the unpadded shards, their batches, the merge of the processes' evaluations);
the slow one runs ``sapd.evaluate`` in 2 CPU processes (gloo) on an odd number of images, where Lightning's
padding ``DistributedSampler`` would evaluate one image twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.utils.data import BatchSampler, DistributedSampler

from conftest import TINY, compose_config
from sapd.data.samplers import AspectRatioBatchSampler, InferenceSampler, shard_range

NUM_VAL = 9  # odd: 2 processes take 5 + 4 images; a padding sampler would give the second one 5 (one repeated)
TWO_CPU_PROCESSES = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
DDP_TIMEOUT_S = 480  # the two processes import torch and Lightning one after the other; generous on a busy machine


@pytest.mark.parametrize("size", [0, 1, 5, 9, 10])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_cover_every_index_once_and_differ_by_at_most_one(size, world):
    shards = [shard_range(size, world, rank) for rank in range(world)]
    assert [i for s in shards for i in s] == list(range(size))  # contiguous, in order, none repeated
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        shard_range(size, world, world)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_inference_sampler_batches_are_the_aspect_ratio_batches_of_its_share(batch_size):
    groups = [0, 1, 1, 0, 1, 0, 0, 1, 1]
    dataset = list(range(len(groups)))
    seen = []
    for rank in range(2):
        sampler = InferenceSampler(dataset, 2, rank, group_ids=groups, batch_size=batch_size)
        assert isinstance(sampler, DistributedSampler)  # what keeps Lightning from swapping in its own
        order = list(sampler)
        assert len(sampler) == len(order) == (5, 4)[rank]
        plain = list(BatchSampler(order, batch_size, drop_last=False))  # a DataLoader's batch_size batching
        share = list(shard_range(len(groups), 2, rank))
        assert plain == list(AspectRatioBatchSampler(share, batch_size, False, groups))
        seen += order
    assert sorted(seen) == dataset
    assert list(InferenceSampler(dataset, 2, 1)) == [5, 6, 7, 8]  # no groups: the share in order


def test_a_process_left_without_images_takes_one_again():
    # fewer images than processes: an empty share would skip the loop and leave the others waiting at the gather
    assert [list(InferenceSampler(list(range(2)), 4, rank)) for rank in range(4)] == [[0], [1], [0], [1]]
    assert list(InferenceSampler([], 2, 1)) == []


def test_datamodule_shards_val_and_test_only_under_a_distributed_trainer(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_config("train", [*TINY, f"data.synthetic.num_val={NUM_VAL}"], tmp_path)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    assert type(dm.val_dataloader().batch_sampler) is AspectRatioBatchSampler  # one process: as before
    ids = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        loader = dm.val_dataloader()
        assert isinstance(loader.sampler, InferenceSampler) and loader.batch_size == cfg.data.val_batch_size
        ids += [int(t["image_id"]) for _, targets in loader for t in targets]
        assert not isinstance(dm.train_dataloader().sampler, DistributedSampler)  # training: Lightning's to set
    assert sorted(ids) == sorted(dm.val_dataset.ids)  # 5 + 4 images, none twice


DRIVER = textwrap.dedent(
    '''
    """sapd.evaluate's command, and what each process evaluated (for tests/test_ddp.py)."""
    import json
    import os
    from pathlib import Path

    import hydra

    from sapd.app import quick_exit
    from sapd.evaluate import evaluate
    from sapd.logging_setup import configure_logging
    from sapd.module import SAPDLitModule
    from sapd.paths import CONFIG_PATH

    seen = {}
    epoch_end = SAPDLitModule.on_validation_epoch_end


    def record(self):
        seen["image_ids"] = list(self.evaluator.image_ids)
        seen["sampler"] = type(self.trainer.val_dataloaders.sampler).__name__
        epoch_end(self)


    SAPDLitModule.on_validation_epoch_end = record


    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
    def main(cfg):
        quick_exit()
        configure_logging()
        table = evaluate(cfg)
        out = Path(os.environ["SAPD_TEST_OUT"]) / f"rank{os.environ.get('LOCAL_RANK', '0')}.json"
        out.write_text(json.dumps({"table": table, **seen}))


    if __name__ == "__main__":
        main()
    '''
)


def run_with_timeout(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Runs ``cmd`` in its own process group; on timeout the whole group (the DDP ranks it started) is killed."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:3])} ... did not finish in {timeout:.0f} s:\n{out[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # a rank left behind by a failed run (the group is ours)
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint of conftest.train_tiny_checkpoint, trained on a set with NUM_VAL (odd) val images
    and without warm-up, so that its 3 steps learn enough for an AP above 0 (at score_thresh 0): with resnet10t,
    since TINY's test_resnet may learn too little in 3 steps for that."""
    from sapd.train import train

    out = tmp_path_factory.mktemp("odd-run")
    overrides = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "validate_best=false"]
    overrides += ["optim.scheduler.warmup_iters=0", "model.backbone.name=resnet10t"]
    train(compose_config("train", [*TINY, f"data.synthetic.num_val={NUM_VAL}", *overrides], out))
    return out / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(odd_checkpoint, tmp_path):
    from sapd.evaluate import evaluate

    # batch_size=1: an image's detections do not depend on the images it is batched with (padding, GroupNorm),
    # so one process and two see exactly the same network outputs; score_thresh=0: many detections per image
    common = [
        f"ckpt_path={odd_checkpoint}",
        "batch_size=1",
        "num_threads=1",
        "score_thresh=0.0",
        "report.enabled=false",
    ]
    single = tmp_path / "single"
    table1 = evaluate(compose_config("eval", [*common, f"results_file={single}/results.json", "trainer=cpu"], single))
    dets1 = json.loads((single / "results.json").read_text())

    ddp = tmp_path / "ddp"
    ddp.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [
        sys.executable,
        str(driver),
        *common,
        f"results_file={ddp}/results.json",
        *TWO_CPU_PROCESSES,
        f"hydra.run.dir={ddp}",
    ]
    env = {**os.environ, "SAPD_TEST_OUT": str(ddp), "OMP_NUM_THREADS": "1"}
    code, out = run_with_timeout(cmd, cwd=tmp_path, env=env, timeout=DDP_TIMEOUT_S)
    assert code == 0, out[-4000:]
    ranks = [json.loads((ddp / f"rank{r}.json").read_text()) for r in range(2)]

    # each process evaluated its own share, unpadded, with sapd's sampler (Lightning did not replace it)
    assert [r["sampler"] for r in ranks] == ["InferenceSampler"] * 2
    assert sorted(len(r["image_ids"]) for r in ranks) == [NUM_VAL // 2, NUM_VAL - NUM_VAL // 2]
    all_ids = {d["image_id"] for d in dets1}
    assert len(all_ids) == NUM_VAL  # score_thresh=0: every image has detections
    assert sorted(ranks[0]["image_ids"] + ranks[1]["image_ids"]) == sorted(all_ids)
    assert "repeated evaluations of an image" not in out

    # (a) the AP of the whole set, the same on both ranks and as in one process
    print(f"AP: 1 process {table1['map']!r}, 2 processes {ranks[0]['table']['map']!r} / {ranks[1]['table']['map']!r}")
    assert ranks[0]["table"] == ranks[1]["table"]
    assert table1["map"] > 0 and table1["mar_100"] > 0  # numbers worth comparing
    assert set(ranks[0]["table"]) == set(table1)
    for key, value in table1.items():
        assert ranks[0]["table"][key] == pytest.approx(value, abs=1e-6), key
    # (b) one results json with every image's detections exactly once
    dets2 = json.loads((ddp / "results.json").read_text())
    assert {d["image_id"] for d in dets2} == all_ids
    assert len(dets2) == len(dets1)
    assert Counter(d["image_id"] for d in dets2) == Counter(d["image_id"] for d in dets1)


TRAIN_DRIVER = textwrap.dedent(
    '''
    """sapd.train with faults on process 1 (for tests/test_ddp.py): SAPD_TEST_NAN_AT=N makes its loss
    non-finite at its N-th step; SAPD_TEST_EMPTY_FROM=N takes every box out of its batches from its N-th
    step on, as a batch of images without annotations would (0: no such fault)."""
    import json
    import os
    from pathlib import Path

    import hydra
    import torch

    from sapd.app import quick_exit
    from sapd.logging_setup import configure_logging
    from sapd.models import SAPD
    from sapd.paths import CONFIG_PATH
    from sapd.train import train

    rank = int(os.environ.get("LOCAL_RANK", "0"))
    loss = SAPD.loss
    steps = {"n": 0}


    nan_at = int(os.environ.get("SAPD_TEST_NAN_AT", "0"))
    empty_from = int(os.environ.get("SAPD_TEST_EMPTY_FROM", "0"))


    def fault_on_rank_1(self, outputs, targets):
        training = torch.is_grad_enabled()  # training, not validation
        if training:
            steps["n"] += 1
        if training and empty_from and rank == 1 and steps["n"] >= empty_from:
            targets = [{**t, "boxes": t["boxes"][:0], "labels": t["labels"][:0]} for t in targets]
        out = loss(self, outputs, targets)
        if training and rank == 1 and steps["n"] == nan_at:
            out = {**out, "total": out["total"] * float("nan")}
        return out


    SAPD.loss = fault_on_rank_1


    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
    def main(cfg):
        quick_exit()
        configure_logging()
        _, objects = train(cfg)
        params = [p.detach().double() for p in objects["module"].parameters()]
        out = Path(os.environ["SAPD_TEST_OUT"]) / f"rank{rank}.json"
        out.write_text(json.dumps({
            "global_step": objects["trainer"].global_step,
            "finite": all(bool(torch.isfinite(p).all()) for p in params),
            "checksum": [float(p.sum()) for p in params],
            "steps": steps["n"],
        }))


    if __name__ == "__main__":
        main()
    '''
)


@pytest.mark.slow
def test_a_process_with_a_non_finite_loss_then_batches_without_boxes_trains_on_without_a_hang(tmp_path):
    """One two-process run, two faults of process 1 alone. At its second step its loss is non-finite:
    both processes skip that step together (a zero-gradient step, so DDP's all-reduce completes). From
    its third step on (the last of phase 1, then phase 2) its batches hold no box while process 0's do:
    every parameter still gets a gradient on process 1 (the selection net runs on no RoI), so DDP's
    all-reduce completes with find_unused_parameters off. Training ends, weights finite and equal on both."""
    driver = tmp_path / "train_driver.py"
    driver.write_text(TRAIN_DRIVER)
    cmd = [
        sys.executable,
        str(driver),
        *TINY,
        *TWO_CPU_PROCESSES,
        "data.synthetic.num_train=24",  # 3 batches of 4 per process and epoch
        "trainer.max_epochs=2",  # phase 1: steps 1-3, phase 2: steps 4-6
        "trainer.limit_val_batches=1",
        "validate_best=false",
        "learning_check.max_skipped_fraction=0.5",  # the skipped step is this test's point
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "SAPD_TEST_OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.update(SAPD_TEST_NAN_AT="2", SAPD_TEST_EMPTY_FROM="3")
    code, out = run_with_timeout(cmd, cwd=tmp_path, env=env, timeout=DDP_TIMEOUT_S)
    assert code == 0, out[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["steps"] for r in ranks] == [6, 6]  # every batch ran on both
    assert [r["global_step"] for r in ranks] == [6, 6]  # the skipped one as a zero-gradient step
    assert all(r["finite"] for r in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # still in sync
    assert out.count("non-finite loss at step 1") == 2  # both processes skipped it
    assert "images [" in out and "on another process" in out
    assert out.count("non-finite loss") == 2 and "switching to phase 2" in out


@pytest.mark.slow
def test_too_many_skipped_steps_stop_every_process_alike(tmp_path):
    """The same run with the default learning_check: 1 of each process's 2 steps skipped (the counts of both
    summed: 2 of 4) is too many; both processes stop with the same reason, before a checkpoint is scored."""
    driver = tmp_path / "train_driver.py"
    driver.write_text(TRAIN_DRIVER)
    run = tmp_path / "run"
    cmd = [sys.executable, str(driver), *TINY, *TWO_CPU_PROCESSES, "trainer.max_epochs=1", f"hydra.run.dir={run}"]
    env = {**os.environ, "SAPD_TEST_OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "SAPD_TEST_NAN_AT": "2"}
    code, out = run_with_timeout(cmd, cwd=tmp_path, env=env, timeout=DDP_TIMEOUT_S)
    assert code != 0 and not (tmp_path / "rank0.json").exists()
    assert out.count("NothingLearnedError: 2 of 4 training steps were skipped") == 2, out[-4000:]
    assert not list((run / "checkpoints").glob("epoch_*.ckpt"))
