"""Paper §4.1: learning-rate schedule (warm-up, milestones, linear scaling) as the optimiser sees it."""

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from sapd.build import _scheduler
from sapd.module import SAPDLitModule
from sapd.optim import lr_factor, optimizer_defaults

OPTIM_DIR = Path(__file__).resolve().parents[1] / "conf" / "optim"


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.GroupNorm(2, 4)


def _configured(steps_per_epoch=100, epochs=12, batch_size=2, devices=8, optim=None, sched=None, **kw):
    optim = optim or functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=1e-4)
    sched = sched or {
        "name": "multistep",
        "milestones": [8, 10],
        "gamma": 0.1,
        "warmup_iters": 500,
        "warmup_ratio": 0.001,
    }
    module = SAPDLitModule(net=_Net(), optimizer=optim, scheduler=sched, batch_size=batch_size, **kw)
    module._trainer = SimpleNamespace(
        world_size=devices,
        accumulate_grad_batches=1,
        estimated_stepping_batches=steps_per_epoch * epochs,
        max_epochs=epochs,
    )
    conf = module.configure_optimizers()
    return conf["optimizer"], conf["lr_scheduler"]["scheduler"]


def _lr_at(optimizer, scheduler, step):
    """The learning rate the LambdaLR of the module gives at optimiser step ``step``."""
    return optimizer.param_groups[0]["initial_lr"] * scheduler.lr_lambdas[0](step)


def test_paper_schedule_at_warmup_and_milestones():
    # 8 GPUs x 2 images = batch 16: lr 0.01 (paper §4.1, docs/design.md §3); 1000 iterations per epoch, 12 epochs.
    optimizer, scheduler = _configured(steps_per_epoch=1000, epochs=12, batch_size=2, devices=8)
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.01)
    assert _lr_at(optimizer, scheduler, 0) == pytest.approx(0.01 * 0.001)  # warm-up start
    assert _lr_at(optimizer, scheduler, 250) == pytest.approx(0.01 * (0.001 + 0.999 * 0.5))
    assert _lr_at(optimizer, scheduler, 500) == pytest.approx(0.01)  # warm-up end
    assert _lr_at(optimizer, scheduler, 7999) == pytest.approx(0.01)  # last step of epoch 8
    assert _lr_at(optimizer, scheduler, 8000) == pytest.approx(0.001)  # start of the 9th epoch
    assert _lr_at(optimizer, scheduler, 9999) == pytest.approx(0.001)
    assert _lr_at(optimizer, scheduler, 10000) == pytest.approx(0.0001)  # start of the 11th epoch
    assert _lr_at(optimizer, scheduler, 11999) == pytest.approx(0.0001)


def test_linear_scaling_with_total_batch():
    optimizer, _ = _configured(batch_size=2, devices=1)  # batch 2 -> lr 0.01 * 2 / 16
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.00125)
    optimizer, _ = _configured(batch_size=4, devices=8)  # batch 32 -> 0.02
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.02)


def test_two_x_schedule_milestones():
    assert lr_factor(15 * 10, steps_per_epoch=10, total_steps=240, milestones=[16, 20], warmup_iters=0) == 1.0
    assert lr_factor(16 * 10, steps_per_epoch=10, total_steps=240, milestones=[16, 20], warmup_iters=0) == (
        pytest.approx(0.1)
    )
    assert lr_factor(20 * 10, steps_per_epoch=10, total_steps=240, milestones=[16, 20], warmup_iters=0) == (
        pytest.approx(0.01)
    )


def test_cosine_and_unknown_name():
    kw = dict(steps_per_epoch=10, total_steps=100, name="cosine", warmup_iters=10, warmup_ratio=0.1, min_ratio=0.0)
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(50, **kw) == pytest.approx(0.5)
    assert lr_factor(100, **kw) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="unknown scheduler name 'poly'"):
        lr_factor(0, steps_per_epoch=1, total_steps=1, name="poly")


def test_no_decay_for_norm_and_bias():
    optim = functools.partial(torch.optim.AdamW, lr=0.004, weight_decay=0.05)
    optimizer, _ = _configured(optim=optim, no_decay_norm_bias=True, batch_size=16, devices=1)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) == 1  # the conv weight
    assert len(no_decay["params"]) == 3  # conv bias, norm weight, norm bias


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_with_a_fused_optimizer(algorithm):
    """bf16 / fp32 have no loss scaler: a fused AdamW is clipped exactly (Lightning would refuse)."""
    optim = functools.partial(torch.optim.AdamW, lr=1e-3, fused=True)
    optimizer, _ = _configured(optim=optim, sched={"name": "cosine"})
    net = _Net()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    owner = SAPDLitModule(net=net, optimizer=optim, batch_size=2)
    owner._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None))
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    owner.configure_gradient_clipping(optimizer, 1.0, algorithm)
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    if algorithm == "norm":
        assert float(grads.norm()) == pytest.approx(1.0, rel=1e-4)
    else:
        assert float(grads.abs().max()) == pytest.approx(1.0)
    # with a loss scaler (fp16) the decision stays with Lightning, which knows the scaler
    owner._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()))
    called = []
    owner.clip_gradients = lambda *args: called.append(args)
    owner.configure_gradient_clipping(optimizer, 1.0, algorithm)
    assert called == [(optimizer, 1.0, algorithm)]


@pytest.mark.parametrize("name", ["sgd", "adamw_cosine"])
def test_the_configured_schedule_gives_the_scaled_lr_times_lr_factor_at_every_step(name):
    """conf/optim/<name>.yaml's partials, finished by the module: at every optimiser step of a 12-epoch run the
    optimiser's lr is the linearly scaled lr times lr_factor of that step, exactly."""
    node = OmegaConf.load(OPTIM_DIR / f"{name}.yaml")
    optim, sched = instantiate(node.optimizer), _scheduler(node.scheduler)
    steps_per_epoch, epochs = 7, 12
    optimizer, scheduler = _configured(steps_per_epoch, epochs, batch_size=4, devices=2, optim=optim, sched=sched)
    base = float(node.optimizer.lr) * 8 / 16  # 2 devices x 4 images, quoted at batch 16
    schedule = {k: v for k, v in OmegaConf.to_container(node.scheduler).items() if not k.startswith("_")}
    total = steps_per_epoch * epochs
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [
        base * lr_factor(s, steps_per_epoch=steps_per_epoch, total_steps=total, **schedule) for s in range(total)
    ]
    assert seen == expected
    assert len(set(seen)) > 3  # warm-up and decay both move it


def test_a_scheduler_config_without_target_is_the_same_schedule():
    """A checkpoint's config from before optim.scheduler was a partial holds the keyword arguments only."""
    node = OmegaConf.load(OPTIM_DIR / "sgd.yaml").scheduler
    plain = {k: v for k, v in OmegaConf.to_container(node).items() if not k.startswith("_")}
    for sched in (_scheduler(node), _scheduler(plain), plain):
        optimizer, scheduler = _configured(steps_per_epoch=1000, epochs=12, sched=sched)  # batch 16: lr 0.01
        assert [_lr_at(optimizer, scheduler, s) for s in (0, 250, 500, 7999, 8000, 10000)] == pytest.approx(
            [0.01 * 0.001, 0.01 * (0.001 + 0.999 * 0.5), 0.01, 0.01, 0.001, 0.0001]
        )


def test_the_lr_is_read_from_the_partial_without_building_an_optimiser():
    built = []

    class Recording(torch.optim.SGD):
        def __init__(self, params, lr=0.5, weight_decay=0.25, **kw):
            built.append(lr)
            super().__init__(params, lr=lr, weight_decay=weight_decay, **kw)

    assert optimizer_defaults(functools.partial(Recording, lr=0.01))["lr"] == 0.01
    assert optimizer_defaults(functools.partial(Recording, lr=0.01))["weight_decay"] == 0.25  # its default
    assert optimizer_defaults(functools.partial(functools.partial(Recording, lr=0.1), lr=0.2))["lr"] == 0.2
    assert built == []
    optimizer, _ = _configured(optim=functools.partial(Recording, lr=0.01), batch_size=2, devices=8)
    assert built == [pytest.approx(0.01)]  # one optimiser, the real one
    with pytest.raises(ValueError, match="needs a number as its lr"):
        optimizer_defaults(functools.partial(Recording, lr="fast"))
