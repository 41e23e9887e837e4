"""Preemption: SIGUSR2/SIGTERM or a flag file → every rank agrees, checkpoints, and exits.

SLURM sends a signal before it kills a job (``#SBATCH --signal=B:USR2@120``), but
``accelerate launch`` and ``torchrun`` do not forward USR1/USR2 to their workers, so the batch
script traps the signal and touches a flag file (``$SSLSTEAL_PREEMPT_FLAG``, default
``<run_dir>/PREEMPT``) that the loop polls; a signal delivered straight to a worker works
too. The decision is all-reduced so that no rank checkpoints alone (a DDP hang). Under SLURM
rank 0 then requeues its own job (``JOBID_TASKID`` for array tasks). USR1 is left alone: NCCL
may use it.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["Preemption", "Preempted", "slurm_job_id", "PREEMPT_EXIT_CODE"]

log = logging.getLogger(__name__)
_PROCESS_START = time.time()  # a flag file older than this process is left over from an earlier run
PREEMPT_EXIT_CODE = 3  # "stopped early, checkpointed, resumable with --resume auto"


class Preempted(RuntimeError):
    """Raised by the loop after the preemption checkpoint is on disk."""


def slurm_job_id(env: dict[str, str] | None = None) -> str | None:
    """The id ``scontrol requeue`` needs: ``ARRAYJOB_TASK`` for array tasks, else ``JOBID``."""
    env = dict(os.environ if env is None else env)
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


class Preemption:
    """Watch for a preemption request; ``should_stop()`` is collective (call it on every rank)."""

    def __init__(self, run_dir: str | os.PathLike, accelerator: Any = None,
                 signals: tuple[int, ...] = (signal.SIGUSR2, signal.SIGTERM)) -> None:
        self.acc = accelerator
        self.flag = Path(os.environ.get("SSLSTEAL_PREEMPT_FLAG") or Path(run_dir) / "PREEMPT")
        self.signalled: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for s in signals:
                self._previous[s] = signal.signal(s, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.signalled = signum

    def clear_stale_flag(self) -> None:
        """Remove a flag left by the run that was preempted (older than this process); a flag
        touched since this process started (e.g. during the query phase) is kept and honoured."""
        if self.acc is None or self.acc.is_main_process:
            try:
                if self.flag.stat().st_mtime < _PROCESS_START:
                    self.flag.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
        if self.acc is not None:
            self.acc.wait_for_everyone()

    def requested(self) -> bool:
        """This rank's own view (signal received or flag file present)."""
        return self.signalled is not None or self.flag.exists()

    def should_stop(self) -> bool:
        """True on every rank if any rank saw a request."""
        local = 1.0 if self.requested() else 0.0
        if self.acc is None or self.acc.num_processes == 1:
            return local > 0
        t = torch.tensor([local], device=self.acc.device)
        return bool(self.acc.reduce(t, reduction="sum").item() > 0)

    def requeue(self) -> bool:
        """Under SLURM, rank 0 requeues this job; returns whether a requeue was issued.

        Not after SIGTERM: SLURM sends TERM on ``scancel``, at the time limit and on its own
        requeue, so requeueing then would make a job impossible to cancel (the trainer still
        checkpoints). USR2 and the flag file are the preemption warnings that requeue.
        """
        if self.acc is not None and not self.acc.is_main_process:
            return False
        if self.signalled == signal.SIGTERM and not self.flag.exists():
            return False
        job = slurm_job_id()
        if not job:
            return False
        try:
            subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
            log.warning("requeued SLURM job %s", job)
            return True
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("could not requeue SLURM job %s: %s", job, e)
            return False

    def close(self) -> None:
        """Restore the previous signal handlers."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
