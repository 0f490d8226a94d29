"""sokd train CONFIG [key=value ...]"""
from __future__ import annotations

from pathlib import Path

PRESET_PREFIX = "preset:"


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a run described by a YAML config",
                       description="Train one run. Overrides are dotted keys, e.g. train.epochs=5 "
                                   "method.T=4 teacher.checkpoint=runs/t/model.pt output.resume=true")
    p.add_argument("config", help="YAML config file (see configs/), or preset:NAME for a config that "
                                  "ships with sokd, e.g. preset:fmnist/teacher")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(run=run)


def preset_path(text: str) -> str | Path:
    """`preset:fmnist/teacher` -> the packaged presets/fmnist/teacher.yaml (the configs `sokd demo`
    runs, so an installed sokd can train them without a checkout); anything else is a path."""
    if not text.startswith(PRESET_PREFIX):
        return text
    from ..errors import SokdError
    from .demo import PRESET_DIR
    root = PRESET_DIR.parent
    name = text[len(PRESET_PREFIX):].removesuffix(".yaml")
    path = root / f"{name}.yaml"
    known = sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.glob("*/*.yaml"))
    if name not in known or not path.is_file():
        raise SokdError(f"unknown preset '{name}'; use one of the packaged presets: {', '.join(known)}")
    return path


def run(args) -> int:
    from .. import config, runner
    from .summary import print_summary
    cfg = config.load(preset_path(args.config), args.overrides)
    summary = runner.train(cfg)
    if summary is not None:  # rank 0 (or the only process) reports
        print_summary(summary, cfg.run_dir)
    return 0
