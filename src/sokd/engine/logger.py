"""Per-epoch metrics to metrics.jsonl and the trackers; the run summary to summary.json."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .. import artifacts
from . import tracking
from ..files import atomic_write_text, check_free_space, is_no_space, no_space_error


class RunLogger:
    def __init__(self, run_dir: Path, trackers: list[tracking.Tracker], config: dict,
                 history: list[dict] | None = None):
        """`history` (a resumed run's rows, from its checkpoint) rewrites metrics.jsonl, so rows
        written after that checkpoint, or lost or cut short by a crash or a full disk, come out
        exactly as the checkpoint knows them; trackers get those rows they lack."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / artifacts.METRICS
        self.rows: list[dict] = []
        if history is not None:
            self.rows = list(history)
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.trackers = trackers
        for tracker in trackers:
            tracker.start(config, self.rows)

    def log(self, row: dict) -> None:
        self.rows.append(row)
        line = (json.dumps(row) + "\n").encode()
        check_free_space(self.path, len(line))
        try:
            # O_NOFOLLOW: a link put in the run directory is never written through
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "ab") as f:
                f.write(line)
                f.flush()
        except OSError as err:
            if is_no_space(err):
                raise no_space_error(self.path, len(line)) from None
            raise
        for tracker in self.trackers:
            tracker.log(row)

    def summary(self, summary: dict) -> None:
        atomic_write_text(self.run_dir / artifacts.SUMMARY, json.dumps(summary, indent=2) + "\n")
        for tracker in self.trackers:
            tracker.summary(summary)

    def close(self) -> None:
        tracking.close_all(self.trackers, tracking.FINISHED)
