"""The one rule for "the best epoch": the latest evaluated epoch with the highest top-1 of a role
on a split. best.pt, the summary's best epoch per network and the validation-selected epoch all
follow it, so a file and a report never disagree about which epoch was best."""
from __future__ import annotations


def selection_split(history: list[dict]) -> str:
    """The split that picks the best epoch: "val" when the run evaluates one, else "test"."""
    return "val" if any("val" in r for r in history) else "test"


def best_row(history: list[dict], role: str, split: str, also: str | None = None) -> dict | None:
    """The row of the latest trained epoch (> 0) with the highest top-1 of `role` on `split`
    (among rows that also evaluated `also`, when given); None when no trained epoch has one."""
    rows = [r for r in history if r["epoch"] > 0 and role in r.get(split, {})
            and (also is None or role in r.get(also, {}))]
    return max(rows, key=lambda r: (r[split][role]["top1"], r["epoch"])) if rows else None


def best_epoch(history: list[dict], primary: str) -> int | None:
    """The epoch best.pt holds: the best of the primary role on the validation split when the
    run has one, else on the test split."""
    row = best_row(history, primary, selection_split(history))
    return row["epoch"] if row is not None else None


def selected(history: list[dict], role: str) -> dict:
    """Test top-1 at the epoch the validation split picks, when the run has one."""
    pick = best_row(history, role, "val", also="test")
    if pick is None:
        return {}
    return {"top1_val_best": pick["val"][role]["top1"], "selected_epoch": pick["epoch"],
            "top1_selected": pick["test"][role]["top1"]}
