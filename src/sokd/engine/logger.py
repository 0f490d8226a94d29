"""Per-epoch metrics to metrics.jsonl and TensorBoard; the run summary to summary.json."""
from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import atomic_write_text


def _flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


class RunLogger:
    def __init__(self, run_dir: Path, tensorboard: bool, keep_epochs_upto: int | None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        if keep_epochs_upto is not None and self.path.exists():
            # resuming: drop lines of epochs the checkpoint does not cover (written after it)
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("epoch", 0) <= keep_epochs_upto:
                    self.rows.append(row)
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.run_dir / "tb"))

    def log(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.writer is not None:
            for key, value in _flatten(row).items():
                if key != "epoch":
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()

    def summary(self, summary: dict) -> None:
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
