"""Experiment tracking for a training loop: the records a run writes to metrics.jsonl, sent as well to TensorBoard
or Weights & Biases (`--report-to none|tensorboard|wandb`).

- one record in, the same numbers out: every numeric field of a metrics.jsonl record (nested dicts flattened with
  "/", e.g. cp_methods/ulysses) becomes a scalar at the record's `step`; strings and None are left out;
- rank 0 only (other ranks get a tracker that does nothing), and each package is imported only when asked for;
- TensorBoard: event files in OUT/tensorboard; a resumed run purges the events after its checkpoint's step, as
  metrics.jsonl drops its records, so that a curve never holds a step twice;
- W&B: a run in OUT/wandb whose id is derived from OUT (a resumed run continues it); offline when WANDB_MODE says
  so or when the W&B server cannot be reached (a cluster node without internet: `wandb sync OUT/wandb/...`
  uploads it later).

Used by 03_continued_pretrain.py and 04_sft.py.

Outside this repository (copy this file and common.py):

    import tracking
    tracker = tracking.open_tracker("tensorboard", "runs/x", config={"lr": 1e-5}, resume_step=0)
    for step in range(1, 101):
        tracker.log({"step": step, "loss": 2.0 / step, "cp_methods": {"ulysses": 4}})
    tracker.close()
"""
from __future__ import annotations

import hashlib
import math
import os
import socket
from pathlib import Path

from common import fail, is_main_process

REPORT_TO = ("none", "tensorboard", "wandb")
WANDB_HOST = ("api.wandb.ai", 443)


def add_tracking_args(parser) -> None:
    """The --report-to flag (03 and 04 call this on their output group)."""
    parser.add_argument("--report-to", choices=REPORT_TO, default="none",
                        help="also send every metrics.jsonl record to TensorBoard (OUT/tensorboard) or W&B "
                             "(OUT/wandb; offline without network); each package is imported only when asked")


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numeric fields of a record as {name: float}, nested dicts flattened with "/" (step excluded)."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, (bool, int, float)) and name != "step" and math.isfinite(float(value)):
            out[name] = float(value)
    return out


class Tracker:
    """Does nothing: --report-to none, and every rank but 0."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, log_dir: Path, resume_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            fail("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
        # purge_step: events at or after it, left by a run killed after its last checkpoint, are discarded
        self.writer = SummaryWriter(str(log_dir), purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=int(record["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_reachable(timeout: float = 2.0) -> bool:
    try:
        socket.create_connection(WANDB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


class WandbTracker(Tracker):
    def __init__(self, out: Path, config: dict, name: str):
        try:
            import wandb
        except ImportError:
            fail("--report-to wandb needs the wandb package: pip install wandb")
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_reachable() else "offline")
        (out / "wandb").mkdir(parents=True, exist_ok=True)
        run_id = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]  # the same OUT continues the same run
        self.run = wandb.init(dir=str(out), id=run_id, resume="allow", mode=mode, name=name, config=config,
                              project=os.environ.get("WANDB_PROJECT", "longctx"))
        self.mode = mode

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def open_tracker(kind: str, out: str | os.PathLike, config: dict | None = None, resume_step: int = 0,
                 name: str | None = None) -> Tracker:
    """A tracker for rank 0 (a no-op elsewhere and for "none"); `resume_step`: the checkpoint step a resumed run
    continues from (0 for a fresh run)."""
    if kind not in REPORT_TO:
        fail(f"--report-to {kind!r}: choose one of {', '.join(REPORT_TO)}")
    if kind == "none" or not is_main_process():
        return Tracker()
    out = Path(out)
    if kind == "tensorboard":
        return TensorBoardTracker(out / "tensorboard", resume_step)
    return WandbTracker(out, config or {}, name or out.name)
