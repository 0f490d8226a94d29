"""sokd models: the zoo (or torchvision / timm classifiers) with parameter count and MACs at an input size.

    sokd models [PATTERN ...]            the CIFAR zoo, then how to list tv.<name> / timm.<name>
    sokd models --tv [PATTERN ...]       torchvision classification models
    sokd models --timm [PATTERN ...]     timm models (needs timm: pip install sokd[timm])

A PATTERN is an exact name (that model only), a shell wildcard (`resnet*`) or text contained in
the name. Up to --max matches are built and measured (params, MACs at --input, stages and how
they were found); more matches are listed by name only.
"""
from __future__ import annotations

DEFAULT_MAX = 10


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list models with params and MACs (zoo, --tv torchvision, --timm timm)",
                       description=__doc__.split("\n\n", 1)[0])
    p.add_argument("patterns", nargs="*", metavar="PATTERN",
                   help="exact name, shell wildcard (resnet*) or text in the name")
    p.add_argument("--tv", action="store_true", help="list torchvision classification models (tv.<name>)")
    p.add_argument("--timm", action="store_true", help="list timm models (timm.<name>; needs timm installed)")
    p.add_argument("--input", default="3x32x32", metavar="CxHxW", help="input size, default 3x32x32")
    p.add_argument("--classes", type=int, default=100, metavar="N", help="classifier size, default 100")
    p.add_argument("--filter", default="", help="only names containing this text")
    p.add_argument("--max", type=int, default=DEFAULT_MAX, dest="max_details", metavar="N",
                   help=f"build and measure at most this many matches (default {DEFAULT_MAX}); "
                        "more are listed by name only")
    p.set_defaults(run=run)


def _m(value) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}M"


def run(args) -> int:
    from ..errors import SokdError
    from ..models import info
    from ..table import render
    try:
        shape = tuple(int(v) for v in args.input.lower().split("x"))
        assert len(shape) == 3 and min(shape) > 0
    except (ValueError, AssertionError):
        raise SokdError(f"--input '{args.input}' is not CxHxW, e.g. 3x32x32 or 1x28x28") from None
    if args.classes < 1:
        raise SokdError(f"--classes must be a positive integer, got {args.classes}")
    if args.max_details < 0:
        raise SokdError(f"--max must be 0 or more, got {args.max_details}")
    sources = [s for s in ("tv", "timm") if getattr(args, s)] or ["zoo"]

    listings = [info.listing(s, args.patterns, shape, args.classes, args.max_details, contains=args.filter)
                for s in sources]

    print(f"input {'x'.join(map(str, shape))}, {args.classes} classes")
    for source, found in zip(sources, listings):
        names, rows = found["names"], found["rows"]
        title = {"zoo": "CIFAR zoo", "tv": "torchvision (tv.<name>)", "timm": "timm (timm.<name>)"}[source]
        if len(sources) > 1 or source != "zoo":
            print(f"\n{title}: {len(names)} model{'s' if len(names) != 1 else ''}")
        if not names:
            print(f"no model matches --filter '{args.filter}'")
            continue
        if rows is None:
            print(f"names only ({len(names)} matches > --max {args.max_details}; give a narrower PATTERN "
                  "or a larger --max for params and MACs):")
            print("\n".join(names))
            continue
        if source == "zoo":
            print(render(["model", "params", "MACs", "stages"],
                         [[r["model"], _m(r["params"]), _m(r["macs"]), r["stages"]] for r in rows]))
        else:
            print(render(["model", "params", "MACs", "stages", "stages from"],
                         [[r["model"], _m(r["params"]), _m(r["macs"]), "-" if r["stages"] is None else r["stages"],
                           r["cut"]] for r in rows], align="lrrrl"))
            for r in rows:  # why a model is refused (params / MACs above are then the uncut model's)
                if r["note"]:
                    print(r["note"] if r["note"].startswith(r["model"]) else f"{r['model']}: {r['note']}")
    if sources == ["zoo"]:
        timm_state = "" if info.timm_installed() else " (timm not installed: pip install sokd[timm])"
        print("\nAlso usable anywhere a model name goes: tv.<name> (torchvision classifiers; list them with "
              f"`sokd models --tv [PATTERN]`) and timm.<name>{timm_state} (list them with "
              "`sokd models --timm [PATTERN]`).")
    return 0
