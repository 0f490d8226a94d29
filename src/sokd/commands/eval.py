"""sokd eval CHECKPOINT: test accuracy of every network in a run checkpoint or model file."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (last.pt, best.pt, student.pt, ...)")
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", metavar="data.key=value",
                   help="data overrides, e.g. data.root=/data/fmnist")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="a plugin (module name or .py file) to import first, as a config's imports: do; "
                        "needed for a checkpoint trained with plugins, which sokd never imports on its own "
                        "(repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def run(args) -> int:
    from .. import runner
    from ..config import data_overrides, import_plugins
    from ..table import pct, render
    data = data_overrides(args.overrides, "eval")
    import_plugins(args.imports)  # the user's own choice, as a config's imports:
    result = runner.evaluate_checkpoint(args.checkpoint, data, args.device, args.precision)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['checkpoint']}: {result['n']} test images")
    print(render(["role", "top-1", "top-5"],
                 [[r, pct(m["top1"]), pct(m["top5"])] for r, m in result["roles"].items()]))
    for pair, m in result["compare"].items():
        print(f"  {pair}: agreement {m['agreement']:.2f}%  KL {m['kl']:.4f}")
    return 0
