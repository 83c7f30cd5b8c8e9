"""Optimisation settings as the module finishes them: the partial optimiser's keywords, and the learning-rate
schedule of paper §4.1 (linear warm-up, then multistep, cosine or constant decay), stepped every optimiser step."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def optimizer_defaults(factory: Callable[..., torch.optim.Optimizer]) -> dict[str, Any]:
    """The keyword arguments a partial optimiser is finished with: the partial's own keywords over the
    optimiser's signature defaults (``lr``, ``weight_decay``, ...), without building one."""
    func, keywords = factory, {}
    while isinstance(func, functools.partial):
        keywords = {**func.keywords, **keywords}
        func = func.func
    params = inspect.signature(func).parameters.values()
    found = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    found.update(keywords)
    if not isinstance(found.get("lr"), (int, float)) or isinstance(found.get("lr"), bool):
        raise ValueError("the optimiser (optim.optimizer) needs a number as its lr")
    return found


def param_groups(net: nn.Module, weight_decay: float, *, no_decay_norm_bias: bool) -> list[dict[str, Any]]:
    """The trainable parameters of ``net`` as optimiser groups: one group, or with ``no_decay_norm_bias`` the
    norm layers' parameters and every bias in a group without weight decay."""
    params = [p for p in net.parameters() if p.requires_grad]
    if not no_decay_norm_bias:
        return [{"params": params}]
    decay, no_decay = [], []
    for module in net.modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if is_norm or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(
    step: int,
    *,
    steps_per_epoch: int,
    total_steps: int,
    name: str = "multistep",
    milestones: Sequence[int] = (8, 10),
    gamma: float = 0.1,
    warmup_iters: int = 500,
    warmup_ratio: float = 0.001,
    min_ratio: float = 0.0,
) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based); paper §4.1.

    Linear warm-up from ``warmup_ratio`` to 1 over ``warmup_iters`` steps (MMDetection's
    ``warmup='linear'``), multiplied by the decay: ``multistep`` divides by ``1/gamma`` at the start
    of each epoch index in ``milestones`` (``[8, 10]``: the 9th and the 11th epoch, as the paper
    says); ``cosine`` anneals to ``min_ratio`` over ``total_steps``; ``constant`` keeps 1.
    """
    if warmup_iters > 0 and step < warmup_iters:
        warm = warmup_ratio + (1.0 - warmup_ratio) * step / warmup_iters
    else:
        warm = 1.0
    if name == "multistep":
        epoch = step // max(steps_per_epoch, 1)
        decay = gamma ** sum(epoch >= m for m in milestones)
    elif name == "cosine":
        t = min(step / max(total_steps, 1), 1.0)
        decay = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    elif name == "constant":
        decay = 1.0
    else:
        raise ValueError(f"unknown scheduler name {name!r}: use 'multistep', 'cosine' or 'constant'")
    return warm * decay


def lr_schedule(
    optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, total_steps: int, **schedule: Any
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of ``optimizer``, stepped every optimiser step: :func:`lr_factor` with
    ``schedule`` (its keyword arguments). A Hydra partial of it (``conf/optim/*.yaml``'s ``scheduler``) is
    finished in :meth:`SAPDLitModule.configure_optimizers`.

    The factor is computed in closed form at each step. torch's LinearLR/MultiStepLR/CosineAnnealingLR
    chained compute the same curve recursively, which rounds differently (not the same lr bit for bit).
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(lr_factor, steps_per_epoch=steps_per_epoch, total_steps=total_steps, **schedule),
    )
