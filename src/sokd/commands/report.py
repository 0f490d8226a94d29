"""sokd report RUN_DIR...: mean ± std table over seeds, and PNG plots."""
from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="aggregate finished runs into a markdown table and plots")
    p.add_argument("runs", nargs="+", help="run directories or folders containing them")
    p.add_argument("--out", default=None, help="write report.md, claims.md and PNG plots into this folder")
    p.add_argument("--claims", action="store_true", help="also check the paper's three claims")
    p.add_argument("--published", action="store_true",
                   help="also print each CIFAR-100 run next to the published CRD/DKD/ReviewKD numbers of its pair")
    p.set_defaults(run=run)


def run(args) -> int:
    from .. import report
    res = report.build(args.runs, args.out)
    print(res["markdown"])
    if args.published:
        from .. import published
        print("\n" + published.compare(report.group([report.load(r) for r in report.find_runs(args.runs)])))
    claims_md = None
    if args.claims:
        from .. import claims
        claims_md = claims.check(args.runs)
        print("\n" + claims_md)
    if args.out:
        report.write_text(Path(args.out) / "report.md", res["markdown"] + "\n")
        if claims_md:
            report.write_text(Path(args.out) / "claims.md", claims_md)
        print(f"wrote {args.out}/report.md and " + ", ".join(res["plots"]))
    return 0
