"""Trackers that keep a run of their own (MLflow, W&B): its id and how far it got, in a marker.

Each such tracker owns one directory of the run directory (`mlflow/`, `wandb/`) holding
`.sokd-tracker`: where its run lives, the run's id and the last epoch it received. The marker is
written before the tracker writes anything else there, so the run directory knows the folder as
sokd's (overwrite may replace it, a rollback removes it), and a resumed run reopens the same
tracker run and sends only the epochs it lacks. Changing where the tracker logs (URI, project,
mode) on resume opens a new tracker run, which receives the whole history.
"""
from __future__ import annotations

import json
from pathlib import Path

from ...errors import SokdError
from ...files import atomic_write_text
from . import Tracker, flatten

MARKER = ".sokd-tracker"
DIRNAMES = ("mlflow", "wandb")


def is_tracker_dir(path: Path) -> bool:
    """A tracker folder sokd created in a run directory."""
    return (path.name in DIRNAMES and path.is_dir() and not path.is_symlink()
            and (path / MARKER).is_file())


class StoredTracker(Tracker):
    dirname = ""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / self.dirname
        self.state: dict = {}

    @classmethod
    def check_dir(cls, run_dir: Path) -> None:
        path = Path(run_dir) / cls.dirname
        if path.exists() and not is_tracker_dir(path):
            raise SokdError(f"'{path}' exists and sokd did not create it (it would log {cls.name} there); "
                            f"move it away or choose another output.dir")

    # -- what a tracker implements ----------------------------------------------------------
    def where(self) -> dict:
        """Where the tracker's run lives; a change opens a new tracker run."""
        raise NotImplementedError

    def open(self, config: dict, run_id: str | None) -> str:
        """Open run `run_id` (None: a new one), record the config; returns the run's id."""
        raise NotImplementedError

    def send(self, metrics: dict[str, float], epoch: int) -> None:
        raise NotImplementedError

    # -- the Tracker interface ----------------------------------------------------------------
    def start(self, config: dict, history: list[dict]) -> None:
        previous = self._read()
        same = previous.get("where") == self.where()
        self.state = {"where": self.where(), "id": previous.get("id") if same else None,
                      "epoch": previous.get("epoch", -1) if same else -1}
        self.dir.mkdir(exist_ok=True)
        self._write()
        self.state["id"] = self.open(config, self.state["id"])
        self._write()
        for row in history:
            if row["epoch"] > self.state["epoch"]:
                self.log(row)

    def log(self, row: dict) -> None:
        self.send({k: v for k, v in flatten(row).items() if k != "epoch"}, row["epoch"])
        self.state["epoch"] = row["epoch"]
        self._write()

    def _read(self) -> dict:
        try:
            state = json.loads((self.dir / MARKER).read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def _write(self) -> None:
        atomic_write_text(self.dir / MARKER, json.dumps(self.state) + "\n")
