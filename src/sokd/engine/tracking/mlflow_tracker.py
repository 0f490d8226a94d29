"""MLflow: params and config.yaml once, metrics per epoch, summary.json and its numbers at the end.

The default store is local — a SQLite file in <run dir>/mlflow (MLflow's own local backend; its
plain-file store is deprecated) with artifacts beside it — so a run needs no server and no
network. `output.mlflow.uri` points elsewhere (a shared `sqlite:///...` file to compare runs, or
a tracking server).
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import warnings
from pathlib import Path

from ...errors import SokdError
from . import FAILED, FINISHED, KILLED, flatten
from .stored import StoredTracker

STATUS = {FINISHED: "FINISHED", FAILED: "FAILED", KILLED: "KILLED"}
#: MLflow's limits per log_batch call and on a param's length
PARAMS_PER_BATCH, METRICS_PER_BATCH, PARAM_CHARS = 100, 1000, 6000


def metric_key(key: str) -> str:
    """A row key as an MLflow metric name (letters, digits, `_ - . / : space`):
    "compare/teacher->student/kl" becomes "compare/teacher_to_student/kl"."""
    return re.sub(r"[^/\w.\- :]", "_", key.replace("->", "_to_"))


def params(config: dict, prefix: str = "") -> dict[str, str]:
    """The resolved config as flat MLflow params ("optim.lr": "0.1")."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(params(v, key + "."))
        else:
            out[key] = (v if isinstance(v, str) else json.dumps(v))[:PARAM_CHARS]
    return out


@contextlib.contextmanager
def _quiet():
    """MLflow (and SQLAlchemy/Alembic under it) log INFO lines and deprecation warnings while a
    store is opened; a training run's output shows none of them."""
    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class MlflowTracker(StoredTracker):
    name = dirname = "mlflow"

    def __init__(self, spec, run_dir: Path, run_name: str):
        super().__init__(run_dir)
        self.spec, self.run_name = spec, run_name
        self.client = None

    @classmethod
    def check(cls, spec, run_dir: Path) -> None:
        cls.check_dir(run_dir)
        if spec.uri is not None and not spec.uri.strip():
            raise SokdError("output.mlflow.uri is empty; give a tracking URI (e.g. sqlite:///mlflow.db) "
                            "or leave it out for a store in the run directory")
        if not spec.uri or spec.uri.startswith("sqlite:"):
            from . import require
            for module in ("sqlalchemy", "alembic"):  # MLflow's SQL store needs both
                require(module, "mlflow", "output.mlflow")

    def where(self) -> dict:
        return self.spec.model_dump()

    def _uri(self) -> str:
        if self.spec.uri:
            return self.spec.uri
        return f"sqlite:///{(self.dir / 'mlflow.db').resolve()}"

    def open(self, config: dict, run_id: str | None) -> str:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        with _quiet():
            self.client = client = MlflowClient(tracking_uri=self._uri())
            experiment = client.get_experiment_by_name(self.spec.experiment)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                local = None if self.spec.uri else (self.dir / "artifacts").resolve().as_uri()
                experiment_id = client.create_experiment(self.spec.experiment, artifact_location=local)
            if run_id is None:
                run = client.create_run(experiment_id, run_name=self.run_name,
                                        tags={"sokd.run_dir": str(self.run_dir.resolve())})
                run_id = run.info.run_id
                items = [Param(k, v) for k, v in params(config).items()]
                for i in range(0, len(items), PARAMS_PER_BATCH):
                    client.log_batch(run_id, params=items[i:i + PARAMS_PER_BATCH])
            else:  # a resumed run: its params stay those it started with, config.yaml is the new one
                client.update_run(run_id, status="RUNNING")
            client.log_dict(run_id, config, "config.yaml")
        self.run_id = run_id
        return run_id

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), now, step) for k, v in values.items()]
        for i in range(0, len(items), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i:i + METRICS_PER_BATCH])

    def send(self, metrics: dict[str, float], epoch: int) -> None:
        self._metrics(metrics, epoch)

    def summary(self, summary: dict) -> None:
        self._metrics({f"summary/{k}": v for k, v in flatten(summary).items()}, int(summary.get("epochs", 0)))
        self.client.log_dict(self.run_id, summary, "summary.json")

    def close(self, status: str) -> None:
        if self.client is None:
            return
        self.client.set_terminated(self.run_id, STATUS[status])
        if status == FINISHED and not self.spec.uri:
            print(f"mlflow: run {self.run_id} in {self.dir / 'mlflow.db'} (browse with `mlflow ui "
                  f"--backend-store-uri {self._uri()}`, which needs the full `mlflow` package)", flush=True)
