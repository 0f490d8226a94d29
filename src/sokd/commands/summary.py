"""Printing a run's summary as a table."""
from __future__ import annotations

from .table import pct, render


def print_summary(summary: dict, run_dir) -> None:
    rows = [[role, n.get("arch"), n.get("params"), pct(n.get("top1_initial")), pct(n["top1_final"]),
             pct(n["top1_best"]), n.get("best_epoch"), pct(n["top5_final"])]
            for role, n in summary["networks"].items()]
    print(f"\n{summary['method']} on {summary['dataset']}: {summary['epochs']} epochs, "
          f"{summary['wall_time_s']:.0f} s, {summary['train_images_per_s'] or 0:.0f} train img/s "
          f"({summary['precision']}) -> {run_dir}")
    print(render(["role", "arch", "params", "top-1 start", "top-1 final", "top-1 best", "best ep",
                  "top-5 final"], rows, align="lllrrrrr"))
    for pair, m in summary.get("compare", {}).items():
        print(f"  {pair}: agreement {m['agreement']:.2f}%  KL {m['kl']:.4f}")
