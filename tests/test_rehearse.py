"""The rehearsal of the COCO job (benchmarks/rehearse.py) and what it found: the drawn set with COCO's
quirks, a resumable checkpoint of the COCO recipe, and (slow) the short rehearsal itself."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_config

REPO = Path(__file__).resolve().parents[1]


def test_a_checkpoint_of_the_sgd_recipe_loads_as_lightning_resumes_it(tmp_path):
    """Lightning resumes (ckpt_path=...) with torch.load(weights_only=True): the hyperparameters a
    checkpoint holds must be plain Python (optim=sgd's milestones were an omegaconf ListConfig)."""
    from sapd.build import build_module

    cfg = compose_config("train", [*TINY, "optim=sgd", "optim.scheduler.milestones=[1,2]"], tmp_path)
    module = build_module(cfg, label_to_cat_id=[1, 3])
    assert module.hparams["scheduler"]["milestones"] == [1, 2]
    buffer = io.BytesIO()
    torch.save({"hyper_parameters": dict(module.hparams)}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["hyper_parameters"]["scheduler"]["milestones"] == [1, 2]
