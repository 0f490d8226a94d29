"""sokd train CONFIG [key=value ...]"""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a run described by a YAML config",
                       description="Train one run. Overrides are dotted keys, e.g. train.epochs=5 "
                                   "method.T=4 teacher.checkpoint=runs/t/model.pt output.resume=true")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(run=run)


def run(args) -> int:
    from .. import config, runner
    from .summary import print_summary
    cfg = config.load(args.config, args.overrides)
    summary = runner.train(cfg)
    if summary is not None:  # rank 0 (or the only process) reports
        print_summary(summary, cfg.run_dir)
    return 0
