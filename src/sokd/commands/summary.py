"""Printing a run's summary as a table."""
from __future__ import annotations

from ..table import pct, render


def print_summary(summary: dict, run_dir) -> None:
    nets = summary["networks"]
    selected = any("top1_selected" in n for n in nets.values())   # the run has a validation split
    rows = [[role, n.get("arch"), n.get("params"), pct(n.get("top1_initial")), pct(n["top1_final"]),
             pct(n["top1_best"]), n.get("best_epoch"), pct(n["top5_final"])]
            + ([pct(n.get("top1_selected")), n.get("selected_epoch")] if selected else [])
            for role, n in nets.items()]
    print(f"\n{summary['method']} on {summary['dataset']}: {summary['epochs']} epochs, "
          f"{summary['wall_time_s']:.0f} s, {summary['train_images_per_s'] or 0:.0f} train img/s "
          f"({summary['precision']}) -> {run_dir}")
    head = ["role", "arch", "params", "top-1 start", "top-1 final", "top-1 best", "best ep", "top-5 final"]
    if selected:
        head += ["top-1 selected", "selected ep"]
    print(render(head, rows, align="lll" + "r" * (len(head) - 3)))
    if selected:
        print(f"  selected = test top-1 at the epoch with the best validation top-1 ({summary.get('val_size')} "
              f"held-out images); best = best test epoch (optimistic)")
    else:
        print("  best = best test epoch (optimistic); data.val_split=0.1 adds an honest selected column")
    for pair, m in summary.get("compare", {}).items():
        print(f"  {pair}: agreement {m['agreement']:.2f}%  KL {m['kl']:.4f}")
