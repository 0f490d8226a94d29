"""Run directory rules: never mix two runs, never leave a half-written file behind."""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import yaml

from ..errors import SokdError
from .checkpoint import atomic_write_text, safe_load

RUN_FILES = ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "summary.json")
#: config sections that may change between a run and its resumption
RESUMABLE_CHANGES = ("output", "train.epochs", "train.device", "train.threads", "train.compile",
                     "data.eval_batch_size")


def _strip(cfg: dict) -> dict:
    """The config without the entries a resumption may change (RESUMABLE_CHANGES)."""
    cfg = copy.deepcopy(cfg)
    for path in RESUMABLE_CHANGES:
        *parents, leaf = path.split(".")
        node = cfg
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    return cfg


def _holds_run(run_dir: Path) -> bool:
    return any((run_dir / f).exists() for f in RUN_FILES)


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SokdError(f"cannot create output directory '{run_dir}' ({err.strerror}); "
                        f"set output.dir to a writable place") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise SokdError(f"output directory '{run_dir}' is not writable; set output.dir to a writable place")


def prepare(run_dir: Path, cfg: dict, resume: bool, overwrite: bool) -> dict | None:
    """Validate the directory for this run; returns the checkpoint to resume from, if any.

    Nothing on disk is changed until every check has passed.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise SokdError(f"output.dir '{run_dir}' is a file; choose a directory")
    if resume and overwrite:
        raise SokdError("output.resume and output.overwrite are both set; choose one")
    ckpt = None
    if resume:
        last = run_dir / "last.pt"
        if not last.exists():
            if _holds_run(run_dir):
                raise SokdError(f"'{run_dir}' has no last.pt to resume from; use output.overwrite=true "
                                f"to start again")
        else:
            ckpt = safe_load(last)
            old = ckpt.get("config")
            if not isinstance(old, dict):
                raise SokdError(f"'{last}' has no config; it is not a sokd run checkpoint")
            if _strip(old) != _strip(cfg):
                diff = _first_difference(_strip(old), _strip(cfg))
                raise SokdError(f"cannot resume '{run_dir}': config differs at '{diff}'; only "
                                f"{', '.join(RESUMABLE_CHANGES)} may change (or use output.overwrite=true)")
    elif _holds_run(run_dir) and not overwrite:
        raise SokdError(f"'{run_dir}' already holds a run; use output.resume=true to continue it, "
                        f"output.overwrite=true to replace it, or another output.dir")
    check_writable(run_dir)
    if overwrite:
        for name in os.listdir(run_dir):
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    return ckpt


def _first_difference(a, b, prefix="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return prefix.rstrip(".") or "(root)"
