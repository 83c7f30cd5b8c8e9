"""Several machines: trainer.num_nodes in every trainer config, and Hydra's submitit launcher for SLURM sweeps.

Nothing is submitted: the configs are composed as ``python -m sapd.train -m hydra/launcher=slurm ...`` composes them,
and the launcher object is built (it only keeps its parameters until a sweep calls it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import compose_config

CONF = Path(__file__).resolve().parents[1] / "conf"
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


@pytest.mark.parametrize("trainer", sorted(p.stem for p in (CONF / "trainer").glob("*.yaml")))
def test_every_trainer_config_takes_num_nodes(trainer, tmp_path):
    cfg = compose_config("train", [f"trainer={trainer}", "trainer.num_nodes=2"], tmp_path)
    assert cfg.trainer.num_nodes == 2
    assert compose_config("eval", ["ckpt_path=x.ckpt", f"trainer={trainer}"], tmp_path).trainer.num_nodes == 1


def test_slurm_launcher_composes_and_passes_the_values_through(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='pip install -e ".[cluster]"')
    cfg = compose_config(
        "train",
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu-a100",
            "hydra.launcher.timeout_min=90",
            "+hydra.launcher.additional_parameters.reservation=detection",  # any other sbatch option
            "trainer=ddp",
            "trainer.devices=8",
            "trainer.num_nodes=2",
        ],
        tmp_path,
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == SLURM_LAUNCHER
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "slurm"
    values = OmegaConf.to_container(launcher, resolve=True)
    assert values["partition"] == "gpu-a100" and values["timeout_min"] == 90
    assert values["additional_parameters"] == {"reservation": "detection"}
    # one task per GPU on as many nodes as the trainer: what Lightning's SLURMEnvironment checks
    assert values["tasks_per_node"] == values["gpus_per_node"] == cfg.trainer.devices == 8
    assert values["nodes"] == cfg.trainer.num_nodes == 2
    built = instantiate(launcher)  # the launcher Hydra would use; building it submits nothing
    assert type(built).__module__ + "." + type(built).__qualname__ == SLURM_LAUNCHER
    assert built.params["partition"] == "gpu-a100" and built.params["nodes"] == 2


def test_slurm_launcher_defaults_to_one_node_where_no_trainer_says_otherwise(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='pip install -e ".[cluster]"')
    cfg = compose_config("train", ["hydra/launcher=slurm"], tmp_path)
    values = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert values["nodes"] == 1 and values["partition"] is None  # the partition is the user's to give
