"""One save / resume / stop component for every training loop of the package.

The five loops (the steal's train phase, SimSiam and classifier victim training, Knockoff clone
training, DFME/MAZE) each hand :class:`RunState` what they train and call three things:

    state = RunState(acc, run / "ckpt", config=to_dict(cfg), may_change=RESUME_MAY_CHANGE,
                     force=cfg.resume_force, run_dir=run)
    state.track(model=raw, optimizer=opt, scheduler=sched)
    found = state.resume(cfg.resume)          # None, or the checkpoint dict (position, extras)
    ...
    for step ...:
        state.step_end(step, periodic=step % every == 0, where=f"at step {step}/{total}",
                       epoch=epoch, batch=index + 1)
    state.save(step, epoch=epochs, batch=0)   # the final one
    state.close()

What a checkpoint holds: every tracked object's ``state_dict()`` (models, optimizers, schedules),
accelerate's GradScaler (fp16) when there is one, every rank's RNG (python, numpy, torch CPU and
CUDA; gathered from all ranks, with any per-rank extras such as a ``torch.Generator``), the
loop's position and extras, the world size and the resolved config. It is written by rank 0
through :func:`stealer.ckpt.save_checkpoint` (a temp file of this process, fsync, ``os.replace``,
then the ``latest`` pointer), so a kill at any instant leaves the previous checkpoint usable.

On resume a checkpoint written with other settings is refused in one line listing the
differences, unless the key is on the loop's allow-list (``may_change``: speed and bookkeeping
keys) or ``force`` (``--resume-force``) is set, in which case the differences are printed.

Preemption: SIGUSR2/SIGTERM or the flag file (:mod:`stealer.preempt`) on any rank → every rank
agrees (an all-reduce in :meth:`should_stop`, every ``preempt_every`` steps: a GPU sync each step
would stall the loop) → checkpoint → rank 0 runs ``scontrol requeue``
under SLURM (``ARRAYJOB_TASK`` for array tasks) → :class:`stealer.preempt.Preempted`, which the
entry points turn into exit code 3 (``launch.common.exit_preempted``).

Modelled on timm's ``CheckpointSaver`` (huggingface/pytorch-image-models, commit 021a523,
``timm/utils/checkpoint_saver.py``: ``CheckpointSaver._save`` / ``save_checkpoint`` /
``save_recovery``: model, optimizer, amp scaler and args in one file, written to a temp path then
``os.replace``d, recovery checkpoints mid-epoch). Unlike timm the temp name is per process and
the file is fsynced before the rename, and the RNGs of every rank travel with it. The SLURM part
follows submitit/Lightning (signal → all ranks agree → checkpoint → ``scontrol requeue``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Union

from stealer.ckpt import config_diff, describe_diff, resolve_resume, rng_state, save_checkpoint, set_rng_state
from stealer.preempt import PREEMPT_CHECK_EVERY, Preempted, Preemption

__all__ = ["RunState"]

PerRank = Optional[Union[dict[str, Any], Callable[[], dict[str, Any]]]]  # see RunState.save

log = logging.getLogger(__name__)


class RunState:
    """Checkpoint, resume and preemption of one training loop (collective: call on every rank).

    ``acc`` is an ``accelerate.Accelerator`` (``process_index``, ``num_processes``,
    ``is_main_process``, ``wait_for_everyone``, ``reduce``; ``scaler`` when fp16). With
    ``ckpt_dir=None`` the component is inert: nothing is resumed, saved or watched.
    ``what`` names the loop in messages ("clone", "dfme"); ``rerun`` and ``start_over`` are the
    hints of the preemption and refusal messages. ``preempt_every``: steps between the ranks'
    agreement on a preemption request (:class:`stealer.preempt.Preemption` ``check_every``; 1: every
    step); a request is acted on at the next such step, on every rank alike.
    """

    def __init__(self, acc: Any, ckpt_dir: str | os.PathLike | None, *, config: dict[str, Any],
                 may_change: set[str] | frozenset[str] = frozenset(), force: bool = False, keep: int = 2,
                 run_dir: str | os.PathLike | None = None, what: str = "",
                 rerun: str = "rerun with --resume auto",
                 start_over: str = "use a new run name (name=...), resume=none to start over, or --resume-force to resume anyway",
                 steps_per_epoch: int | None = None, preempt_every: int = PREEMPT_CHECK_EVERY) -> None:
        self.acc = acc
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
        self.config, self.may_change, self.force, self.keep = config, set(may_change), force, keep
        self.what, self.rerun, self.start_over = what, rerun, start_over
        self.steps_per_epoch = steps_per_epoch
        self.rank = getattr(acc, "process_index", 0)
        self.world = getattr(acc, "num_processes", 1)
        self.objects: dict[str, Any] = {}
        self._extras: list[Callable[[], dict[str, Any]]] = []
        self._on_stop: list[Callable[[], Any]] = []
        self.mine: dict[str, Any] = {}  # this rank's per-rank extras of the resumed checkpoint
        self.resumed_from: Path | None = None
        self.found: dict[str, Any] | None = None
        self.last_saved_step: int | None = None
        self.preempt: Preemption | None = None
        if self.ckpt_dir is not None:
            self.preempt = Preemption(Path(run_dir) if run_dir is not None else self.ckpt_dir.parent, acc,
                                      check_every=preempt_every)
            self.preempt.clear_stale_flag()

    @property
    def enabled(self) -> bool:
        return self.ckpt_dir is not None

    @property
    def is_main(self) -> bool:
        return bool(getattr(self.acc, "is_main_process", True))

    def _scaler(self) -> Any:
        return getattr(self.acc, "scaler", None)

    def track(self, **objects: Any) -> RunState:
        """Objects with ``state_dict()`` / ``load_state_dict()`` saved and restored under these names
        (pass unwrapped models: ``acc.unwrap_model``; the same objects may be prepared later)."""
        self.objects.update(objects)
        return self

    def save_also(self, extras: Callable[[], dict[str, Any]]) -> RunState:
        """``extras()`` (a dict: e.g. an attack's state) is computed and written at every save."""
        self._extras.append(extras)
        return self

    def on_stop(self, fn: Callable[[], Any]) -> RunState:
        """``fn()`` runs before a preemption is raised (e.g. close a progress bar)."""
        self._on_stop.append(fn)
        return self

    # ------------------------------------------------------------------ resume
    def _label(self) -> str:
        return f"{self.what} checkpoint" if self.what else "checkpoint"

    def resume(self, resume: str) -> dict[str, Any] | None:
        """Load the checkpoint ``resume`` names (``auto``: the newest valid one) into every tracked
        object, the GradScaler and this rank's RNG; returns it (position, extras), or None.

        A checkpoint written with other settings (outside ``may_change``) raises a one-line
        ValueError naming each key with its old and new value, unless ``force``.
        """
        if self.ckpt_dir is None:
            return None
        found = resolve_resume(resume, self.ckpt_dir)
        if found is None:
            return None
        path, state = found
        old = state.get("config", state.get("settings", {}))  # "settings": clone / data-free checkpoints before the component
        changed = config_diff(old, self.config, self.may_change)
        if changed and not self.force:
            raise ValueError(f"{self._label()} {path} was written with other settings "
                             f"({describe_diff(old, self.config, changed[:6])}); {self.start_over}")
        if changed and self.is_main:
            print(f"warning: --resume-force: resuming {path} although these settings differ: "
                  f"{describe_diff(old, self.config, changed)}", flush=True)
        missing = [name for name in self.objects if name not in state]
        if missing:
            raise ValueError(f"{self._label()} {path} holds no {', '.join(missing)} (another kind of run wrote it); "
                             f"{self.start_over}")
        for name, obj in self.objects.items():
            obj.load_state_dict(state[name])
        scaler = self._scaler()
        if scaler is not None and state.get("scaler"):  # fp16: the loss scale goes on where it was
            scaler.load_state_dict(state["scaler"])
        elif scaler is not None and self.is_main:
            print(f"warning: {path} holds no GradScaler state (written without fp16); the loss scale starts afresh", flush=True)
        ranks = state.get("ranks") or [{"rng": r} for r in state.get("rng", [])]
        if len(ranks) == self.world:  # every rank gets its own generators back (same world size)
            self.mine = ranks[self.rank]
            set_rng_state(self.mine["rng"])
        elif ranks and self.is_main:
            print(f"warning: {path} was written by {len(ranks)} processes, this run has {self.world}: random "
                  f"generators start afresh, so the run is not an exact continuation", flush=True)
        self.resumed_from = path
        self.last_saved_step = int(state["step"]) if "step" in state else None
        return state

    def resume_at(self, resume: str, total: int, say: Callable[[str], Any] | None = None,
                  what: str = "") -> tuple[int, int, int]:
        """:meth:`resume`, then ``(epoch, batch, step)`` to continue from (``(0, 0, 0)`` when nothing was
        resumed), said on rank 0 (``print`` unless ``say``); the checkpoint dict is kept in ``self.found``."""
        self.found = self.resume(resume)
        if self.found is None:
            return 0, 0, 0
        epoch, batch, step = int(self.found["epoch"]), int(self.found["batch"]), int(self.found["step"])
        if self.is_main:
            (say or (lambda m: print(m, flush=True)))(
                f"{what}resumed from {self.resumed_from} at epoch {epoch}, batch {batch} (step {step}/{total})")
        return epoch, batch, step

    # ------------------------------------------------------------------ save
    def save(self, step: int, per_rank: PerRank = None, **extra: Any) -> Path | None:
        """Checkpoint ``step`` (collective): tracked objects, scaler, every rank's RNG and
        ``per_rank`` extras (a dict, or a function returning one, called only when saving),
        ``extra`` (position: ``epoch``/``batch``; loop extras). With ``steps_per_epoch`` set,
        ``batch`` past the epoch's end rolls over to the next epoch."""
        if self.ckpt_dir is None:
            return None
        if self.steps_per_epoch and "batch" in extra and extra["batch"] >= self.steps_per_epoch:
            extra["epoch"], extra["batch"] = extra["epoch"] + 1, 0
        mine = {"rng": rng_state(), **((per_rank() if callable(per_rank) else per_rank) or {})}
        if self.world > 1:
            from accelerate.utils import gather_object

            ranks = gather_object([mine])
        else:
            ranks = [mine]
        path = None
        if self.is_main:
            body = {name: obj.state_dict() for name, obj in self.objects.items()}
            scaler = self._scaler()
            if scaler is not None:
                body["scaler"] = scaler.state_dict()
            for more in self._extras:
                body.update(more())
            body.update(step=step, ranks=ranks, world_size=self.world, config=self.config, **extra)
            path = save_checkpoint(self.ckpt_dir, step, body, keep=self.keep)
        self.last_saved_step = step
        if self.world > 1:
            self.acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ preemption
    def should_stop(self) -> bool:
        """Collective: True on every rank when any rank saw SIGUSR2/SIGTERM or the flag file (looked at
        every ``preempt_every`` calls with several processes)."""
        return self.preempt is not None and self.preempt.should_stop()

    def step_end(self, step: int, *, periodic: bool, where: str, per_rank: PerRank = None,
                 **extra: Any) -> None:
        """After a step: checkpoint when ``periodic``; on a preemption request checkpoint (once)
        and :meth:`stop`. ``where`` ends the message ("victim training preempted" + " at step 5/9")."""
        if self.ckpt_dir is None:
            return
        if periodic:
            self.save(step, per_rank, **extra)
        if self.should_stop():
            if not periodic:
                self.save(step, per_rank, **extra)
            self.stop(where)

    def stop(self, where: str) -> NoReturn:
        """Requeue (rank 0, under SLURM) and raise :class:`Preempted` (the checkpoint is on disk)."""
        for fn in self._on_stop:
            fn()
        requeued = self.preempt.requeue() if self.preempt is not None else False
        self.close()
        raise Preempted(f"{where}; checkpoint saved in {self.ckpt_dir}"
                        + ("; SLURM job requeued" if requeued else f"; {self.rerun}"))

    def close(self) -> None:
        """Restore the signal handlers (idempotent)."""
        if self.preempt is not None:
            self.preempt.close()
