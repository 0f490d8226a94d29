"""TensorBoard event files in <run dir>/tb (one scalar per number of each epoch's row)."""
from __future__ import annotations

from pathlib import Path

from ..rundir import TB_DIR
from . import Tracker, flatten


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.writer = None

    def start(self, config: dict, history: list[dict]) -> None:
        """A resumed run appends to the event files it already has (so `history` is not sent)."""
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(self.run_dir / TB_DIR))

    def log(self, row: dict) -> None:
        for key, value in flatten(row).items():
            if key != "epoch":
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()
