"""sapd's Hydra configs: found through the package (conf/ is installed as sapd.conf), in a checkout and in the wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest
from hydra import compose
from hydra.core.global_hydra import GlobalHydra

from sapd.errors import ConfigError
from sapd.paths import CONFIG_MODULE, config_path, initialize_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A fast_dev_run small enough to take seconds: a few tiny synthetic images.
FDR = [
    "debug=fdr",
    "logger=none",
    "data.synthetic.num_train=8",
    "data.synthetic.num_val=4",
    "data.synthetic.min_side=96",
    "data.synthetic.max_side=128",
    "data.synthetic.max_objects=4",
    "data.min_size=96",
    "data.max_size=128",
    "data.val_min_size=null",
    "data.val_max_size=null",
    "data.batch_size=2",
    "data.val_batch_size=2",
]


def _conf_yaml() -> set[str]:
    """Every config under conf/, as a path relative to conf/."""
    return {p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml")}


def _folder_of(path: str) -> Path:
    """The folder behind a Hydra config_path from sapd.paths (a ``pkg://`` module or an absolute folder)."""
    if path.startswith("pkg://"):
        return Path(str(resources.files(path.removeprefix("pkg://")))).resolve()
    return Path(path).resolve()


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SAPD_CONFIG_DIR", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", **extra)
    return env


def _copy_project(dest: Path) -> Path:
    """The files a build reads (pyproject, README, src/sapd, conf), without caches or egg-info."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "src" / "sapd", dest / "src" / "sapd", ignore=ignore)
    shutil.copytree(CONF, dest / "conf", ignore=ignore)
    return dest


def test_pyproject_lists_every_package():
    """pyproject names its packages explicitly (sapd.conf needs it), so a new subpackage must be added there."""
    tomllib = pytest.importorskip("tomllib")
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT / "src").parts) for p in (ROOT / "src" / "sapd").rglob("__init__.py")}
    assert set(setuptools_cfg["packages"]) == found | {CONFIG_MODULE}
    assert setuptools_cfg["package-dir"][CONFIG_MODULE] == "conf"
    assert (CONF / "__init__.py").is_file()  # Hydra reads pkg:// only from a regular package


def test_configs_come_from_this_checkout(monkeypatch):
    monkeypatch.delenv("SAPD_CONFIG_DIR", raising=False)
    assert _folder_of(config_path()) == CONF.resolve()


def test_compose_through_the_package(monkeypatch):
    monkeypatch.delenv("SAPD_CONFIG_DIR", raising=False)
    GlobalHydra.instance().clear()
    try:
        with initialize_configs():
            cfg = compose("train", overrides=["model=fcos"])
    finally:
        GlobalHydra.instance().clear()
    assert cfg.model._target_.startswith("sapd.models.")
    assert cfg.data._target_ == "sapd.data.datamodule.SyntheticCOCODataModule"


def test_sapd_config_dir_overrides(monkeypatch, tmp_path):
    mine = tmp_path / "my_conf"
    shutil.copytree(CONF, mine, ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
    train_yaml = mine / "train.yaml"
    train_yaml.write_text(train_yaml.read_text() + "\nmy_marker: 1234\n")
    monkeypatch.setenv("SAPD_CONFIG_DIR", str(mine))
    assert config_path() == str(mine.resolve())
    GlobalHydra.instance().clear()
    try:
        with initialize_configs():
            cfg = compose("train")
    finally:
        GlobalHydra.instance().clear()
    assert cfg.my_marker == 1234


def test_sapd_config_dir_must_be_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("SAPD_CONFIG_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="SAPD_CONFIG_DIR=.*missing is not a folder"):
        config_path()


def test_a_checkout_on_pythonpath_uses_its_own_conf(tmp_path):
    """Another tree's src/ first on PYTHONPATH reads that tree's conf/, not the installed sapd.conf."""
    other = _copy_project(tmp_path / "other")
    code = "from sapd.paths import CONFIG_PATH; import sapd; print(sapd.__file__); print(CONFIG_PATH)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_clean_env(PYTHONPATH=str(other / "src")),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert Path(out[0]).resolve() == (other / "src" / "sapd" / "__init__.py").resolve()
    assert Path(out[1]) == (other / "conf").resolve()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, Path]:
    """(the built wheel, a folder it is installed into), built offline from a copy of the project."""
    base = tmp_path_factory.mktemp("wheel")
    src = _copy_project(base / "project")
    dist, site = base / "dist", base / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(dist)],
        cwd=src,
        env=_clean_env(),
        check=True,
    )
    (whl,) = dist.glob("sapd-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(whl)], env=_clean_env(), check=True)
    return whl, site


def _run_from_wheel(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cwd.mkdir(exist_ok=True)
    env = _clean_env(PYTHONPATH=str(site), SAPD_LOG_DIR=str(cwd / "logs"), SAPD_DATA_DIR=str(cwd / "data"))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_wheel_carries_every_config_and_module(wheel):
    whl, _ = wheel
    names = set(zipfile.ZipFile(whl).namelist())
    shipped = {n.removeprefix("sapd/conf/") for n in names if n.startswith("sapd/conf/") and n.endswith(".yaml")}
    assert shipped == _conf_yaml()
    assert "sapd/conf/__init__.py" in names
    modules = {"sapd/" + p.relative_to(ROOT / "src" / "sapd").as_posix() for p in (ROOT / "src" / "sapd").rglob("*.py")}
    assert modules <= names


# One process outside the repository: where sapd and its configs come from, then every command's
# config, and a config group, composed through the installed package (the fast_dev_run below starts
# the train command itself).
FROM_THE_WHEEL = """
import sys
import sapd, sapd.paths
from hydra import compose
from omegaconf import OmegaConf
print(sapd.__file__, sapd.paths.CONFIG_PATH)
with sapd.paths.initialize_configs():
    for name in sys.argv[1:]:
        print(name, len(compose(config_name=name)))
    print(OmegaConf.select(compose(config_name="train", overrides=["model=fcos"]), "model._target_"))
"""


@pytest.mark.slow
def test_wheel_composes_its_config_outside_the_repository(wheel, tmp_path):
    _, site = wheel
    commands = sorted(p.stem for p in CONF.glob("*.yaml"))
    run = _run_from_wheel(site, tmp_path, "-c", FROM_THE_WHEEL, *commands)
    assert run.returncode == 0, run.stderr[-3000:]
    first, *composed, fcos = run.stdout.splitlines()
    module_file, path = first.split()
    assert Path(module_file).resolve().is_relative_to(site.resolve())
    assert path == "pkg://sapd.conf"
    assert [line.split()[0] for line in composed] == commands and all(int(line.split()[1]) > 1 for line in composed)
    assert fcos == "sapd.models.FCOSDetector"


@pytest.mark.slow
def test_wheel_trains_a_fast_dev_run(wheel, tmp_path):
    _, site = wheel
    run = _run_from_wheel(site, tmp_path, "-m", "sapd.train", *FDR)
    assert run.returncode == 0, run.stderr[-3000:]
    (hydra_yaml,) = (tmp_path / "logs").glob("*/runs/*/.hydra/hydra.yaml")
    assert "path: sapd.conf\n      schema: pkg" in hydra_yaml.read_text()
    assert not (tmp_path / "conf").exists()


def test_the_test_files_run_first_exist():
    """conftest.HEAVY_FIRST orders the suite for pytest-xdist by file name: a renamed file would drop out."""
    from conftest import HEAVY_FIRST

    missing = [name for name in HEAVY_FIRST if not (ROOT / name).is_file()]
    assert missing == []
