"""MLflow: params and config.yaml once, metrics per epoch, summary.json and its numbers at the end.

The default store is local — a SQLite file in <run dir>/mlflow (MLflow's own local backend; its
plain-file store is deprecated) with artifacts beside it — so a run needs no server and no
network. `output.mlflow.uri` points elsewhere (a shared `sqlite:///...` file to compare runs, or
a tracking server).

A server is probed before the run writes anything (`probe`: one TCP connection, a few seconds at
most), so an unreachable `output.mlflow.uri` is a one-line error at once, not minutes of MLflow's
own retries before training. sokd's later calls run with a short HTTP timeout and few retries
(`_bounded_http`, unless the environment sets MLflow's own variables), so a server lost mid-run
costs seconds before the tracker is switched off.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ...errors import SokdError
from . import FAILED, FINISHED, KILLED, flatten
from .stored import StoredTracker

STATUS = {FINISHED: "FINISHED", FAILED: "FAILED", KILLED: "KILLED"}
#: MLflow's limits per log_batch call and on a param's length
PARAMS_PER_BATCH, METRICS_PER_BATCH, PARAM_CHARS = 100, 1000, 6000
#: seconds the reachability probe of a tracking server may take, name lookup included
PROBE_TIMEOUT = 5.0
#: MLflow's HTTP settings for sokd's calls (its defaults: 120 s timeout, 7 retries with backoff)
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
#: default ports of the URI schemes whose server is probed
DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


def server_address(uri: str) -> tuple[str, int] | None:
    """(host, port) of the server a tracking URI names (http(s) or a SQL database), else None
    (a local file, sqlite, databricks, ...)."""
    try:
        parts = urlsplit(uri)
        scheme = parts.scheme.lower().split("+")[0]  # postgresql+psycopg2 -> postgresql
        port = parts.port
    except ValueError:
        return None
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.hostname, port or DEFAULT_PORTS[scheme]


def probe(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why a TCP connection to host:port fails (None: it connects), within `timeout` seconds in all.

    The lookup and the connection run in a daemon thread that is abandoned at the deadline:
    getaddrinfo has no timeout of its own, and a blackholed address would keep connect waiting
    for the kernel's SYN retries (minutes).
    """
    result: list[str | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except socket.timeout:
            result.append(f"no answer within {timeout:g} s")
        except socket.gaierror as err:
            result.append(f"cannot resolve host '{host}': {err.strerror or err}")
        except OSError as err:
            result.append((err.strerror or str(err) or type(err).__name__).lower())

    worker = threading.Thread(target=attempt, name="sokd-mlflow-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    if not result:
        return f"no answer within {timeout:g} s"
    return result[0]


def shown_uri(uri: str) -> str:
    """The URI without a password, for messages."""
    try:
        parts = urlsplit(uri)
        if parts.password is None:
            return uri
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return uri


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT) -> None:
    """SokdError when the server of tracking URI `uri` does not accept a connection."""
    address = server_address(uri)
    if address is None:
        return
    reason = probe(*address, timeout=timeout)
    if reason is not None:
        raise SokdError(f"cannot reach MLflow at {shown_uri(uri)} ({reason}); start the server, fix "
                        f"output.mlflow.uri, or drop it for a local store")


@contextlib.contextmanager
def _bounded_http():
    """MLflow's HTTP timeout and retries set for the calls inside (unless the user set them)."""
    added = {k: v for k, v in HTTP_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


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
        with warnings.catch_warnings(), _bounded_http():
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
        if spec.uri:
            check_reachable(spec.uri.strip())

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
        with _bounded_http():
            for i in range(0, len(items), METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=items[i:i + METRICS_PER_BATCH])

    def send(self, metrics: dict[str, float], epoch: int) -> None:
        self._metrics(metrics, epoch)

    def summary(self, summary: dict) -> None:
        self._metrics({f"summary/{k}": v for k, v in flatten(summary).items()}, int(summary.get("epochs", 0)))
        with _bounded_http():
            self.client.log_dict(self.run_id, summary, "summary.json")

    def close(self, status: str) -> None:
        if self.client is None:
            return
        with _bounded_http():
            self.client.set_terminated(self.run_id, STATUS[status])
        if status == FINISHED and not self.spec.uri:
            print(f"mlflow: run {self.run_id} in {self.dir / 'mlflow.db'} (browse with `mlflow ui "
                  f"--backend-store-uri {self._uri()}`, which needs the full `mlflow` package)", flush=True)
