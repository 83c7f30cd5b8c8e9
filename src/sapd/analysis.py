"""``python -m sapd.analysis ckpt_path=CKPT [out=DIR] [batches=N]`` (config ``conf/analysis.yaml``): the
pictures of soft weights and level selection by object size (:mod:`sapd.diagnostics.soft_weights`)."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from sapd.app import hydra_app
from sapd.checks import check_config
from sapd.diagnostics.soft_weights import AnalysisError, analyse, default_out
from sapd.logging_setup import configure_logging

log = logging.getLogger(__name__)


@hydra_app("sapd.analysis", "analysis")
def main(cfg: DictConfig) -> None:
    """Writes the pictures and logs their paths; a bad checkpoint or data is one line on stderr, exit code 2."""
    configure_logging()
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise AnalysisError("give the checkpoint to analyse: python -m sapd.analysis ckpt_path=PATH")
    check_config(cfg)
    paths = analyse(cfg.ckpt_path, cfg.out or default_out(cfg.ckpt_path), int(cfg.batches))
    for path in paths:
        log.info("wrote %s", path)


if __name__ == "__main__":
    main()
