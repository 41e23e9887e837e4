"""Preemption: SIGUSR2/SIGTERM or a flag file → every rank agrees, checkpoints, and exits.

SLURM sends a signal before it kills a job (``#SBATCH --signal=B:USR2@120``), but
``accelerate launch`` and ``torchrun`` do not forward USR1/USR2 to their workers, so the batch
script traps the signal and touches a flag file (``$SSLSTEAL_PREEMPT_FLAG``, default
``<run_dir>/PREEMPT``) that the loop polls; a signal delivered straight to a worker works
too. The decision is all-reduced so that no rank checkpoints alone (a DDP hang). Under SLURM
rank 0 then requeues its own job (``JOBID_TASKID`` for array tasks). USR1 is left alone: NCCL
may use it.

The all-reduce runs every ``check_every``-th call only (:data:`PREEMPT_CHECK_EVERY` in the training
loops' :class:`stealer.engine.RunState`): on GPUs it is a collective plus a ``.item()``, a host-device
sync that stalls the step pipeline, and paid every step it costs more than the warning needs (SLURM
warns minutes ahead). The signal is still recorded the moment it arrives (the handler), and every rank
calls the same number of times, so all ranks take the decision at the same call: the stop, and the
checkpoint written there, stay agreed and a resume stays bitwise.
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

__all__ = ["Preemption", "Preempted", "slurm_job_id", "PREEMPT_EXIT_CODE", "PREEMPT_CHECK_EVERY"]

log = logging.getLogger(__name__)
_PROCESS_START = time.time()  # a flag file older than this process is left over from an earlier run
PREEMPT_EXIT_CODE = 3  # "stopped early, checkpointed, resumable with --resume auto"
PREEMPT_CHECK_EVERY = 10  # training steps between the ranks' agreements (RunState's default)


class Preempted(RuntimeError):
    """Raised by the loop after the preemption checkpoint is on disk."""


def slurm_job_id(env: dict[str, str] | None = None) -> str | None:
    """The id ``scontrol requeue`` needs: ``ARRAYJOB_TASK`` for array tasks, else ``JOBID``."""
    env = dict(os.environ if env is None else env)
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


class Preemption:
    """Watch for a preemption request; ``should_stop()`` is collective (call it on every rank).

    Args:
        check_every: calls of :meth:`should_stop` between the ranks' agreements (an all-reduce on
            several processes; 1: every call, as the query phase does between paid batches). One
            process needs no agreement and looks at every call.
    """

    def __init__(self, run_dir: str | os.PathLike, accelerator: Any = None,
                 signals: tuple[int, ...] = (signal.SIGUSR2, signal.SIGTERM), check_every: int = 1) -> None:
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every={check_every!r} must be an int >= 1 (1: agree on every call)")
        self.acc = accelerator
        self.check_every = check_every
        self.calls = 0  # should_stop calls so far (the same count on every rank)
        self.collectives = 0  # of which agreed across ranks
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
        """True on every rank if any rank saw a request -- looked at on every ``check_every``-th call
        with several processes (the others return False without a collective), on every call with one."""
        self.calls += 1
        if self.acc is None or self.acc.num_processes == 1:
            return self.requested()
        if self.calls % self.check_every:
            return False
        self.collectives += 1
        t = torch.tensor([1.0 if self.requested() else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(t, reduction="sum").item() > 0)  # .item(): the host-device sync

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
