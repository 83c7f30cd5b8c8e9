"""sapd's Hydra configs, installed as the package ``sapd.conf`` (read by Hydra as ``pkg://sapd.conf``)."""
