"""Experiment trackers behind one interface: TensorBoard, MLflow and Weights & Biases.

The run logger hands every tracker the same four things — the resolved config and the rows a
resumed run already has (`start`), each epoch's row (`log`), the summary (`summary`) and how the
run ended (`close`) — so the engine never asks which trackers are on. `check` runs before the
run directory is touched: a tracker whose package is missing is a one-line error there, never a
failure half-way through a run. Once a run has started, a tracker that fails (a lost network, a
server that went away) is switched off with one warning and training goes on: metrics.jsonl and
summary.json are the run's own record.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import SokdError

if TYPE_CHECKING:
    from ...config import OutputSpec

#: closing states a tracker is told (a run that finished, raised, or was stopped by a signal)
FINISHED, FAILED, KILLED = "finished", "failed", "killed"


def flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested row as {"test/student/top1": 81.2, ...} (bools and text left out)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


class Tracker:
    """One place a run's config, per-epoch metrics and summary are sent to."""

    name = "tracker"

    def start(self, config: dict, history: list[dict]) -> None:
        """Open (or reopen, on resume) this tracker's run; `history` holds the rows the run
        already has, for a tracker that may lack some of them."""

    def log(self, row: dict) -> None:
        """One metrics.jsonl row (epoch 0 = before training)."""

    def summary(self, summary: dict) -> None:
        """The run's summary.json content, once, at the end."""

    def close(self, status: str) -> None:
        """FINISHED, FAILED or KILLED."""


#: tracker name -> (import name, pip extra); the package is imported only when the tracker is on
PACKAGES = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def require(module: str, extra: str, setting: str) -> None:
    """Import `module` (not just find it: a broken install is refused too) or explain the fix."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        missing = isinstance(err, ModuleNotFoundError) and err.name == module
        problem = "is not installed" if missing else f"fails to import ({str(err).splitlines()[0][:120]})"
        raise SokdError(f"{setting} is on but the '{module}' package {problem}; "
                        f"pip install 'sokd[{extra}]' (or set {setting}=false)") from None


def enabled(output: "OutputSpec") -> list[str]:
    return [name for name in ("tensorboard", "mlflow", "wandb") if getattr(output, name)]


def check(output: "OutputSpec", run_dir: Path) -> None:
    """Everything about the trackers that can be refused before the run writes anything."""
    for name in enabled(output):
        if name in PACKAGES:
            require(*PACKAGES[name], f"output.{name}")
    if output.mlflow is not None:
        from .mlflow_tracker import MlflowTracker
        MlflowTracker.check(output.mlflow, run_dir)
    if output.wandb is not None:
        from .wandb_tracker import WandbTracker
        WandbTracker.check(output.wandb, run_dir)


def create(output: "OutputSpec", run_dir: Path, run_name: str) -> list[Tracker]:
    """The trackers the config asks for, each guarded (see `Guarded`); nothing is written yet."""
    trackers: list[Tracker] = []
    if output.tensorboard:
        from .tensorboard_tracker import TensorBoardTracker
        trackers.append(TensorBoardTracker(run_dir))
    if output.mlflow is not None:
        from .mlflow_tracker import MlflowTracker
        trackers.append(MlflowTracker(output.mlflow, run_dir, run_name))
    if output.wandb is not None:
        from .wandb_tracker import WandbTracker
        trackers.append(WandbTracker(output.wandb, run_dir, run_name))
    return [Guarded(t) for t in trackers]


class Guarded(Tracker):
    """A tracker whose failures stop that tracker, never the run: the first exception it raises
    is one warning on stderr, and the tracker gets no further calls."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.name = tracker.name
        self.failed = False
        self.closed = False

    def _call(self, method: str, *args) -> None:
        if self.failed or self.closed:
            return
        try:
            getattr(self.tracker, method)(*args)
        except Exception as err:  # noqa: BLE001 - any tracker failure is the tracker's, not the run's
            self.failed = True
            text = (str(err).strip().splitlines() or [""])[0][:200]
            print(f"sokd: warning: {self.name} logging stopped ({type(err).__name__}: {text}); training "
                  f"goes on, metrics.jsonl and summary.json keep every epoch", file=sys.stderr, flush=True)

    def start(self, config: dict, history: list[dict]) -> None:
        self._call("start", config, history)

    def log(self, row: dict) -> None:
        self._call("log", row)

    def summary(self, summary: dict) -> None:
        self._call("summary", summary)

    def close(self, status: str) -> None:
        self._call("close", status)
        self.closed = True


def close_all(trackers: list[Tracker], status: str) -> None:
    for tracker in trackers:
        tracker.close(status)
