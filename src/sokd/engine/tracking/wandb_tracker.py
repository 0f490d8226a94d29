"""Weights & Biases: the config, one history row per epoch (x-axis `epoch`) and the summary.

Offline by default: everything stays in <run dir>/wandb and `wandb sync` uploads it later, so a
run never waits for, or fails because of, a network. Online mode is refused up front when no
credentials are configured (W&B would otherwise ask for an API key on the terminal).
"""
from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

from ...errors import SokdError
from . import FINISHED
from .stored import StoredTracker


def has_credentials() -> bool:
    """W&B credentials are configured (an API key or identity token in the environment, or a
    .netrc entry for the W&B host), read without asking W&B, which would prompt when none are."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker(StoredTracker):
    name = dirname = "wandb"

    def __init__(self, spec, run_dir: Path, run_name: str):
        super().__init__(run_dir)
        self.spec, self.run_name = spec, run_name
        self.run = None

    @classmethod
    def check(cls, spec, run_dir: Path) -> None:
        cls.check_dir(run_dir)
        if spec.mode == "online" and not has_credentials():
            raise SokdError("output.wandb.mode=online needs W&B credentials: set WANDB_API_KEY or run "
                            "`wandb login` first, or use output.wandb.mode=offline (and `wandb sync` later)")

    def where(self) -> dict:
        return self.spec.model_dump()

    def open(self, config: dict, run_id: str | None) -> str:
        import wandb
        run_id = run_id or uuid.uuid4().hex[:12]
        settings = wandb.Settings(silent=True, console="off", disable_git=True, init_timeout=60.0)
        self.run = wandb.init(project=self.spec.project, entity=self.spec.entity, name=self.run_name,
                              id=run_id, resume="allow", dir=str(self.run_dir.resolve()),
                              mode=self.spec.mode, settings=settings, reinit="create_new")
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")
        # a resumed run may have changed resumable keys (optim.lr, train.epochs, output.*)
        self.run.config.update(config, allow_val_change=True)
        return run_id

    def send(self, metrics: dict[str, float], epoch: int) -> None:
        self.run.log({**metrics, "epoch": epoch})

    def summary(self, summary: dict) -> None:
        self.run.summary.update(summary)

    def close(self, status: str) -> None:
        if self.run is None:
            return
        self.run.finish(exit_code=0 if status == FINISHED else 1)
        if status == FINISHED and self.spec.mode == "offline":
            # one folder per start or resume, named by start time and id, plus "-1" when a resume
            # starts within the same second as the previous start
            print(f"wandb: offline run {self.run.id} in {self.dir} (upload with `wandb sync "
                  f"{self.dir}/offline-run-*-{self.run.id}*`)", flush=True)
