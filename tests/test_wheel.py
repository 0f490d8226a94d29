"""The installable package: packaged presets by name, and (slow) a wheel built from the source
tree that holds every module and data file and runs from a fresh virtualenv.

The slow test builds without build isolation (the setuptools of this environment, no index) and
gives the new virtualenv this environment's site-packages as a plain path entry, so torch and
the other dependencies come from here while sokd itself can only come from the wheel (the
editable install's path file is not processed there).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from sokd import config
from sokd.cli import main
from sokd.commands.train import preset_path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "src" / "sokd"


def test_a_packaged_preset_is_named_with_preset_prefix():
    path = preset_path("preset:fmnist/teacher")
    assert Path(path).is_file() and Path(path).is_relative_to(PACKAGE / "presets")
    cfg = config.load(path, ["train.epochs=1"])
    assert cfg.model.arch == config.read_yaml(path)["model"]["arch"]
    assert cfg.data.name == "fashion_mnist" and cfg.train.epochs == 1
    assert preset_path("configs/fmnist/sokd.yaml") == "configs/fmnist/sokd.yaml"


def test_an_unknown_preset_is_one_line_naming_the_packaged_ones(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "preset:fmnist/nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("sokd: error: unknown preset 'fmnist/nope'; use one of the packaged presets: ")
    assert "fmnist/teacher" in err and "fmnist/sokd" in err
    assert list(tmp_path.iterdir()) == []


def _package_files(root: Path) -> set[str]:
    return {p.relative_to(root.parent).as_posix() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")}


def _run(args, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args}: {proc.stderr[-2000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_wheel_holds_the_package_and_runs_from_a_fresh_virtualenv(tmp_path):
    pytest.importorskip("build")
    source = tmp_path / "source"  # a copy, so the build writes nothing into the checkout
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, source], cwd=source)
    wheel, = dist.glob("sokd-*.whl")

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    expected = _package_files(source / "src" / "sokd")
    assert expected - names == set(), "every module and data file of src/sokd is in the wheel"
    assert {n for n in expected if n.startswith("sokd/presets/")} >= {
        f"sokd/presets/fmnist/{m}.yaml" for m in ("recipe", "teacher", "vanilla", "kd", "sokd")}
    assert any(n.endswith(".dist-info/entry_points.txt") for n in names)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip())
    (site / "deps-from-dev-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=tmp_path)

    work = tmp_path / "work"
    work.mkdir()
    where = _run([python, "-c", "import sokd; print(sokd.__file__)"], cwd=work).stdout.strip()
    assert Path(where).is_relative_to(site), f"sokd imported from {where}, not from the wheel"
    sokd_cli = venv / "bin" / "sokd"
    assert "--methods" in _run([sokd_cli, "demo", "--help"], cwd=work).stdout
    assert "resnet8" in _run([sokd_cli, "models"], cwd=work).stdout
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    out = _run([sokd_cli, "train", "preset:fmnist/teacher", "train.epochs=1", "data.train_per_class=20",
                "data.test_limit=200", "output.progress=false", f"output.dir={work / 'teacher'}"], cwd=work).stdout
    assert "1 epochs" in out and (work / "teacher" / "model.pt").is_file()
    assert list(work.iterdir()) == [work / "teacher"]
