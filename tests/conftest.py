"""Shared fixtures: tiny synthetic runs that train in seconds on a CPU."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from sokd import methods

torch.set_num_threads(2)
# property tests (tests/test_properties.py) never depend on the machine's speed (no per-example
# deadline, no "too slow" health check) and draw the same examples every run;
# SOKD_HYPOTHESIS_PROFILE=explore draws new ones (still without time limits)
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # only tests/test_properties.py needs it (a dev dependency)
    pass
else:
    settings.register_profile("deterministic", deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("explore", deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("SOKD_HYPOTHESIS_PROFILE", "deterministic"))
# decoded image folders (data.in_memory) are cached here, never in the user's ~/.cache
os.environ.setdefault("SOKD_FOLDER_CACHE", tempfile.mkdtemp(prefix="sokd-test-folder-cache-"))


def tiny_config(tmp_path: Path, method: str = "vanilla", **sections) -> dict:
    """A run config on the synthetic data set with small networks; override sections by kwargs."""
    cfg = {
        "name": method,
        "method": {"name": method},
        "data": {"name": "synthetic", "synthetic_size": 256, "synthetic_shape": [3, 16, 16],
                 "synthetic_classes": 4, "batch_size": 32, "eval_batch_size": 64},
        "optim": {"lr": 0.05},
        "schedule": {"name": "multistep", "milestones": [2]},
        "train": {"epochs": 2, "seed": 0, "precision": "fp32"},  # numerics independent of the CPU
        "output": {"dir": str(tmp_path / "runs" / method), "tensorboard": False, "progress": False},
    }
    networks = {  # every network section a method may take, at toy size
        "model": {"arch": "resnet8"},
        "teacher": {"arch": "resnet14", "checkpoint": str(tmp_path / "teacher.pt")},
        "student": {"arch": "resnet8"},
        "peers": [{"arch": "resnet8"}],
    }
    for role in methods.config_roles(method):
        cfg[role] = networks[role]
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(tmp_path: Path, cfg: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def one_thread():
    """Tiny models on one thread: OpenMP threads cost more than they save on toy tensors."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_config(tmp_path):
    def make(method="vanilla", **sections):
        return tiny_config(tmp_path, method, **sections)
    return make


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory):
    """A resnet14 teacher trained 2 epochs on the synthetic set, saved as a model file."""
    from sokd import config, runner
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = tiny_config(tmp, "vanilla", model={"arch": "resnet14"}, train={"epochs": 2, "seed": 0})
    runner.train(config.build(cfg))
    return Path(cfg["output"]["dir"]) / "model.pt"


def stop_after_checks(monkeypatch, checks: int = 12) -> None:
    """Make the training loop see a SIGTERM at its `checks`-th look at the stop flag (the loop
    looks once per step, so this stops a run at a known step)."""
    from sokd.engine import loop as loop_mod
    calls = {"n": 0}

    class StopAtStep(loop_mod.StopRequest):
        @property
        def requested(self):
            calls["n"] += 1
            self.signum = 15 if calls["n"] == checks else self.signum
            return calls["n"] >= checks

    monkeypatch.setattr(loop_mod, "StopRequest", StopAtStep)

