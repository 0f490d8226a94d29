"""Per-epoch metrics to metrics.jsonl and TensorBoard; the run summary to summary.json."""
from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import atomic_write_text, check_free_space, is_no_space, no_space_error


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
    def __init__(self, run_dir: Path, tensorboard: bool, history: list[dict] | None = None):
        """`history` (a resumed run's rows, from its checkpoint) rewrites metrics.jsonl, so rows
        written after that checkpoint, or lost or cut short by a crash or a full disk, come out
        exactly as the checkpoint knows them."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        if history is not None:
            self.rows = list(history)
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.run_dir / "tb"))

    def log(self, row: dict) -> None:
        self.rows.append(row)
        line = (json.dumps(row) + "\n").encode()
        check_free_space(self.path, len(line))
        try:
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()
        except OSError as err:
            if is_no_space(err):
                raise no_space_error(self.path, len(line)) from None
            raise
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
