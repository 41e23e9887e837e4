#!/usr/bin/env python
"""Chaos on the query phase: SIGKILLs at chosen and random moments of ``launch/steal.py
phases=[query]`` on 1 and 2 processes, each followed by ``--resume auto``, with the budget equal to
the number of images.

Prints a JSON block, then one line per world size: kills sent and proven, kills per aimed moment
and per launcher, images re-paid (target 0), whether every run finished (a re-paid image would
exhaust the budget: exit 2), and whether the final cache is byte-equal to an uninterrupted run's
(every ``resp-*.tar`` and sidecar, and the manifest but for its ``created`` time).

Where a kill lands (``--aims``):

* ``charge`` (seen from outside): the moment the ledger shows a random later charge of this
  launch (polled every millisecond); ``uniform``: a uniform random moment of what is left of the
  phase, once this launch has begun buying (its purchase journal grew).
* a named point of the query phase (forked launches only): the chosen rank stops itself with
  SIGSTOP on the ``n``-th pass through the point (``n`` random over the batches left), writes one
  line ``chaos: rank R stopped at POINT #N`` to its log first, and the kill comes from outside
  while it is stopped. The points (see ``POINTS``): ``journal.before`` / ``journal.after`` (the
  batch's purchase intent not yet / just fsynced), ``charge.before`` (the victim's forward done,
  the charge not committed) / ``charge.after`` (charged with its answer kept, not yet back in the
  stealer), ``write.before`` (the background writer about to cache a batch), ``write.inside`` (its
  sidecar written, its tar not), ``forget.before`` (cached, the victim's kept answer not yet
  dropped), ``recover.after`` (a resumed launch has read back what earlier launches paid for and
  cached nothing yet), ``settle.before`` / ``finalize.before`` (every batch cached, the journal
  not settled, the manifest not written).

On 2 processes a kill hits both ranks, or (``--single``, share) one rank only: then the other is
left to end by itself (it fails at its next collective; torchrun's agent stops it) and is killed
too if it has not within 120 s (counted as ``survivors_killed``).

A kill is *proven* when every process it was aimed at was running (and, on 2 processes, both
ranks were found) the moment it was sent, each killed process ended by SIGKILL (a forked rank:
its wait status; torchrun's agent: exit -9; a torchrun worker: gone from ``/proc``, and for a
single-rank kill torchrun's own report of ``Signal 9``), every process of the launch (the agent,
the ranks and their descendants, found by parent links through ``/proc``: torchrun starts its
workers in sessions of their own) is gone before the next launch, and the phase had not finished
(no readable ``query_phase.json``). Only proven kills count towards ``--kills``; ``kills_cache_partial``
counts those after which fewer images were cached than the run needs, ``window_kills`` those that
left images charged but not cached (the window that cost 10-20 re-paid images per kill before the
victim kept answers with their charges).

Launchers: ``fork`` runs ``launch/steal.py``'s ``main`` in forked children of this already-imported
script (one, or one per rank with the environment torchrun gives its workers: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT; accelerate and gloo rendezvous as under torchrun), real processes
running the real entry point without ~5-10 s of imports per start, and without torchrun's agent;
``torchrun`` (2 processes) and ``exec`` (1 process) start fresh interpreters on
``launch/steal.py`` (~20-45 s per 2-process start on a busy 2-core machine: the agent's torch
import, then both workers' imports, accelerate and gloo set-up). ``--torchrun-kills`` proven kills
of each multi-process world size are made under torchrun (external aims only: the entry point is
``launch/steal.py`` untouched), the rest with ``--launch``. The uninterrupted reference run uses
``--launch``.

    python benchmarks/chaos_query.py --kills 50 --nproc 1 2 --torchrun-kills 10   # the target
    python benchmarks/chaos_query.py --images 96 --batch 8 --kills 2 --nproc 2 --torchrun-kills 0
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# point -> (module, attribute, stop before or after the call); what a stop there leaves behind
POINTS: dict[str, tuple[str, str, str]] = {
    "journal.before": ("stealer.cache", "ResponseCache.intend", "before"),
    "journal.after": ("stealer.cache", "ResponseCache.intend", "after"),
    "charge.before": ("victims.ledger", "QueryLedger.charge_answer", "before"),
    "charge.after": ("victims.ledger", "QueryLedger.charge_answer", "after"),
    "write.before": ("stealer.steal", "_cache_batch", "before"),
    "write.inside": ("stealer.cache", "tar_writer", "before"),
    "forget.before": ("victims.api", "VictimAPI.forget", "before"),
    "recover.after": ("stealer.cache", "ResponseCache.recover_paid", "after"),
    "settle.before": ("stealer.cache", "ResponseCache.settle_journal", "before"),
    "finalize.before": ("stealer.cache", "ResponseCache.finalize", "before"),
}
ONCE = {"recover.after", "settle.before", "finalize.before"}  # passed once per launch (settle, finalize: rank 0)
EXTERNAL = ("charge", "uniform")
STOP_ENV = "SSLSTEAL_CHAOS_STOP"


# ---------------------------------------------------------------- processes
def _stat(pid: int) -> tuple[int, str] | None:
    """``(ppid, state)`` of a live PID from /proc, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), fields[0]


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, their children, ...), from /proc."""
    children = _children_map()
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def alive(pid: int) -> bool:
    """Running, sleeping or stopped; a zombie (``Z``) or dead (``X``) process is not alive."""
    st = _stat(pid)
    return st is not None and st[1] not in ("Z", "X")


def stopped(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] in ("T", "t")


def kill_tree(proc: Any, timeout: float = 10.0) -> list[int]:
    """SIGKILL ``proc`` and every descendant by PID (not by process group: torchrun's workers
    have sessions of their own); waits for the launcher and asserts that every PID is gone.
    Returns the descendants' PIDs."""
    victims = descendants(proc.pid)
    for pid in [proc.pid, *victims]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout)
    _assert_gone(victims, timeout)
    return victims


def _assert_gone(pids: list[int], timeout: float) -> None:
    deadline = time.time() + timeout
    while any(alive(p) for p in pids):
        if time.time() > deadline:
            raise AssertionError(f"processes {[p for p in pids if alive(p)]} survived SIGKILL")
        time.sleep(0.02)


def install_stop(spec: str) -> None:
    """In a forked rank: stop this process (SIGSTOP) on the ``n``-th pass through ``point`` when
    its rank is ``rank``, after one line to stderr; ``spec`` is ``point:n:rank``."""
    import importlib

    point, n, rank = spec.split(":")
    module, attr, when = POINTS[point]
    if int(os.environ.get("RANK", "0")) != int(rank):
        return
    mod = importlib.import_module(module)
    owner, name = (mod, attr) if "." not in attr else (getattr(mod, attr.split(".")[0]), attr.split(".")[1])
    real = getattr(owner, name, None)
    if real is None:  # the code moved: say so loudly instead of never stopping
        raise SystemExit(f"chaos: {module}.{attr} is gone; update POINTS in benchmarks/chaos_query.py")
    passes = [0]

    def stop() -> None:
        passes[0] += 1
        if passes[0] == int(n):
            sys.stderr.write(f"chaos: rank {rank} stopped at {point} #{n}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGSTOP)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if when == "before":
            stop()
        out = real(*args, **kwargs)
        if when == "after":
            stop()
        return out

    setattr(owner, name, wrapped)


class Forked:
    """``launch/steal.py``'s ``main`` in a forked child of this (already imported) process: a real
    process running the real entry point, without paying the ~5-10 s of imports per launch.
    The ``subprocess.Popen`` surface that the kill loop needs: ``pid``, ``poll``, ``wait``, ``returncode``."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        pid = os.fork()
        if pid == 0:  # the child: run the entry point, never return into the parent's code
            code = 1
            try:
                os.environ.update(env or {})
                fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                if os.environ.get(STOP_ENV):
                    install_stop(os.environ[STOP_ENV])
                from launch.steal import main as steal_main

                steal_main(argv)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - report and exit like the interpreter would
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pid, self.returncode = pid, None

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, flags)
            if pid:
                self.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"process {self.pid} still running after {timeout} s")
            time.sleep(0.01)
        return self.returncode  # type: ignore[return-value]


def rank_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    """The environment torchrun gives worker ``rank`` of ``nproc`` on one node."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_RANK": "0", "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


class ForkedGroup:
    """``nproc`` forked ranks with the environment torchrun gives its workers (no agent).
    ``wait`` returns the first non-zero rank exit."""

    def __init__(self, nproc: int, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        port = free_port()
        self.ranks = [Forked(argv, log_path, {**rank_env(r, nproc, port), **(env or {})}) for r in range(nproc)]

    def wait(self, timeout: float | None = None) -> int:
        codes = [p.wait(timeout) for p in self.ranks]
        return next((c for c in codes if c != 0), 0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Launch:
    """One launch of the steal: its rank processes (forked children of this script, or
    torchrun's workers, or one fresh interpreter) and torchrun's agent when there is one."""

    def __init__(self, kind: str, handles: list[Any], agent: subprocess.Popen | None = None) -> None:
        self.kind, self.handles, self.agent, self.t0 = kind, handles, agent, time.time()

    def ranks(self) -> list[int]:
        """The PIDs of the processes that run ``launch/steal.py`` (torchrun's: the agent's children)."""
        if self.agent is not None:
            return sorted(p for p in _children_map().get(self.agent.pid, []) if alive(p))
        return [h.pid for h in self.handles]

    def poll(self) -> int | None:
        """None while any process of the launch runs, else the first non-zero exit (0 if none)."""
        procs = [self.agent] if self.agent is not None else self.handles
        codes = [p.poll() for p in procs]
        if any(c is None for c in codes):
            return None
        return next((c for c in codes if c != 0), 0)

    def wait(self, timeout: float) -> int:
        deadline = time.time() + timeout
        while (code := self.poll()) is None:
            if time.time() > deadline:
                raise TimeoutError(f"launch still running after {timeout} s")
            time.sleep(0.01)
        return code


# ---------------------------------------------------------------- the run
def steal_args(a: argparse.Namespace, name: str) -> list[str]:
    return [f"out_dir={a.work}", f"name={name}", "cpu=true", "phases=[query]", f"victim.checkpoint={a.victim}",
            f"data.query={a.data}", f"data.image_size={a.image_size}", f"query.batch_size={a.batch}",
            f"query.num_queries={a.images}", f"victim.budget={a.images}", "--resume", "auto"]


def launch(a: argparse.Namespace, name: str, nproc: int, kind: str, stop: str = "") -> Launch:
    """Start the steal ``name`` on ``nproc`` processes, its output appended to ``<work>/<name>.log``:
    forked from this process (``kind`` fork; ``stop``: a point to stop at, ``point:n:rank``) or
    fresh interpreters (exec: one process; torchrun: several)."""
    log_path = Path(a.work) / f"{name}.log"
    env = {STOP_ENV: stop} if stop else {}
    if kind == "fork":
        group = ForkedGroup(nproc, steal_args(a, name), log_path, env) if nproc > 1 else None
        return Launch(kind, group.ranks if group else [Forked(steal_args(a, name), log_path, env)])
    assert not stop, "stop points need forked ranks"
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    with open(log_path, "ab") as logf:
        p = subprocess.Popen(launcher + [str(REPO / "launch" / "steal.py"), *steal_args(a, name)], env=child_env(),
                             stdout=logf, stderr=logf, start_new_session=True)
    return Launch(kind, [p], agent=p if nproc > 1 else None)


def spent(run: Path) -> int:
    path = run / "victim_state" / "ledger.sqlite"
    if not path.is_file():
        return 0
    with sqlite3.connect(path, timeout=30) as con:
        row = con.execute("SELECT spent FROM users WHERE user = 'attacker'").fetchone()
    return 0 if row is None else int(row[0])


def cached(run: Path) -> int:
    """Images in complete response shards (a tar exists only once complete)."""
    n = 0
    for tar in (run / "cache").glob("resp-*.tar"):
        try:
            n += int(json.loads(tar.with_suffix(".json").read_text())["count"])
        except (OSError, ValueError, KeyError):
            pass
    return n


def journal_size(run: Path) -> int:
    return sum(p.stat().st_size for p in (run / "cache").glob("journal-r*.jsonl")) if (run / "cache").is_dir() else 0


def cache_bytes(run: Path) -> dict[str, bytes]:
    """What must be equal between two runs: every response shard and sidecar, and the manifest
    without its creation time."""
    out = {p.name: p.read_bytes() for p in sorted((run / "cache").glob("resp-*"))}
    manifest = json.loads((run / "cache" / "manifest.json").read_text())
    manifest.pop("created", None)
    out["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return out


def phase_done(run: Path) -> bool:
    """Whether the query phase finished: rank 0 wrote ``query_phase.json`` (readable: its write is
    not atomic, a kill in it leaves a torn file and the next launch writes it again)."""
    try:
        json.loads((run / "query_phase.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _log_tail(path: Path, start: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_launch(p: Launch, rank_index: int | None, timeout: float = 120.0) -> dict[str, Any]:
    """SIGKILL every process of ``p`` (``rank_index`` None) or one rank with its descendants, then
    make sure that every process of the launch is gone (a surviving rank of a single-rank kill is
    given ``timeout`` s to end by itself, then killed). Returns what was killed and how it ended."""
    ranks = p.ranks()
    everything = ([p.agent.pid] if p.agent is not None else []) + ranks
    everything += [d for r in everything for d in descendants(r) if d not in everything]
    if rank_index is None:
        targets = everything
    else:
        targets = [ranks[rank_index], *descendants(ranks[rank_index])]
    _kill(targets)
    survivor_killed = False
    if rank_index is not None:
        try:
            p.wait(timeout)
        except TimeoutError:  # the other rank did not end by itself: kill it too (reported)
            survivor_killed = True
            _kill(everything)
    p.wait(30)
    _assert_gone(everything, 30)
    unproven = ""  # empty when each killed process is seen to have ended by SIGKILL
    if p.agent is None:  # forked ranks (or one fresh interpreter): their wait status says how they ended
        codes = {h.pid: h.returncode for h in p.handles}
        if any(codes[pid] != -signal.SIGKILL for pid in targets if pid in codes):
            unproven = f"a killed rank did not end by SIGKILL: {codes}"
    elif rank_index is None and p.agent.returncode != -signal.SIGKILL:
        unproven = f"torchrun's agent did not end by SIGKILL: exit {p.agent.returncode}"
    return {"targets": targets, "processes": everything, "survivor_killed": survivor_killed, "unproven": unproven,
            "ranks": [r for r in ranks if r in targets],
            "codes": [h.returncode for h in ([p.agent] if p.agent is not None else p.handles)]}


def _wait_active(p: Launch, run: Path, journal0: int, want_stop: bool, timeout: float = 900) -> tuple[bool, int | None]:
    """Wait until the launch has begun buying (its journal grew) or, with ``want_stop``, until one
    of its ranks stopped itself; returns ``(active, stopped rank index)``; ``(False, None)`` when
    the launch ended first."""
    deadline = time.time() + timeout
    while p.poll() is None:
        if want_stop:
            ranks = p.ranks()
            hit = [i for i, r in enumerate(ranks) if stopped(r)]
            if hit:
                return True, hit[0]
        elif journal_size(run) > journal0:
            return True, None
        if time.time() > deadline:
            raise TimeoutError(f"{run.name}: launch neither active nor ended after {timeout} s")
        time.sleep(0.003)
    return False, None


def chaos(a: argparse.Namespace, nproc: int, kills: int, rng: random.Random) -> dict:
    ref = Path(a.work) / f"ref{nproc}"
    t0 = time.time()
    first = launch(a, ref.name, nproc, a.launch)
    if first.wait(900) != 0:
        raise SystemExit(f"the uninterrupted run failed: {(ref.parent / f'{ref.name}.log').read_text()[-2000:]}")
    phase_s = json.loads((ref / "query_phase.json").read_text())["seconds"]
    log(f"[{nproc} proc] uninterrupted run ({a.launch}): {time.time() - t0:.1f} s wall, query phase {phase_s:.2f} s")
    ref_bytes = cache_bytes(ref)
    aims = [x.strip() for x in a.aims.split(",") if x.strip()]
    torchrun_quota = a.torchrun_kills if nproc > 1 else 0
    row: dict[str, Any] = {
        "nproc": nproc, "images": a.images, "kills": 0, "kills_sent": 0, "kills_proven": 0, "kills_cache_partial": 0,
        "window_kills": 0, "images_in_window": 0, "kills_by_aim": {}, "kills_by_launcher": {},
        "single_rank_kills": 0, "both_rank_kills": 0, "survivors_killed": 0, "processes_killed": 0, "workers_killed": 0,
        "trials": 0, "relaunches": 0, "images_repaid": 0, "answers_recovered_logged": 0,
        "answers_recovered_last_launch": 0, "finished": True, "cache_byte_equal": True, "ledger_spent": 0,
        "reference_phase_s": round(phase_s, 3), "start_s": {}}
    cycle: list[str] = []
    while row["kills_proven"] < kills:
        row["trials"] += 1
        run = Path(a.work) / f"chaos{nproc}-{row['trials']}"
        log_path = Path(a.work) / f"{run.name}.log"
        after_phase = False
        while True:  # one trial: kill at chosen moments until a launch finishes by itself
            row["relaunches"] += 1
            kind = "torchrun" if row["kills_by_launcher"].get("torchrun", 0) < torchrun_quota else a.launch
            if kind != "fork":
                aim = rng.choice([x for x in aims if x in EXTERNAL] or list(EXTERNAL))
            else:  # the next aim of a shuffled cycle, taken off once a kill there is proven
                if not cycle:
                    cycle = rng.sample(aims, len(aims))
                aim = cycle[-1]
            # a single-rank kill whenever the share of them so far is under --single (1 in 2 for 0.5: the first, ...)
            single = nproc > 1 and row["single_rank_kills"] < a.single * (row["kills_proven"] + 1)
            left = max(a.images - cached(run), 0)
            left_batches = max(-(-left // (a.batch * nproc)), 1)
            stop = ""
            if aim in POINTS:
                at_rank = 0 if aim in ("settle.before", "finalize.before") else rng.randrange(nproc)
                stop = f"{aim}:{1 if aim in ONCE else rng.randint(1, left_batches)}:{at_rank}"
            journal0, log0 = journal_size(run), (log_path.stat().st_size if log_path.exists() else 0)
            p = launch(a, run.name, nproc, kind, stop)
            active, stopped_rank = _wait_active(p, run, journal0, bool(stop))
            if active:
                row["start_s"].setdefault(kind, []).append(round(time.time() - p.t0, 2))
            if active and aim == "charge":  # right after the j-th charge of this launch commits: the window
                target = spent(run) + a.batch * rng.randint(1, left_batches)
                while p.poll() is None and spent(run) < target:
                    time.sleep(0.001)
            elif active and aim == "uniform":  # a random moment of what is left of the phase
                time.sleep(rng.uniform(0, phase_s * left / a.images))
            ranks = [r for r in p.ranks() if alive(r)]
            if not active or p.poll() is not None or kills <= row["kills_proven"] or len(ranks) < nproc:
                if stop and p.poll() is None and any(stopped(r) for r in ranks):
                    os.kill(next(r for r in ranks if stopped(r)), signal.SIGCONT)
                break  # finished, finishing (a rank has exited) or enough kills: let it end by itself
            if stop:
                line = f"chaos: rank {stop.split(':')[2]} stopped at {aim} #{stop.split(':')[1]}"
                if line not in _log_tail(log_path, log0):
                    raise AssertionError(f"a rank stopped without its line {line!r} in {log_path}")
            which = None
            if single:
                which = stopped_rank if stopped_rank is not None else rng.randrange(nproc)
            killed = kill_launch(p, which)
            paid, have = spent(run), cached(run)
            unfinished = not phase_done(run)
            if not unfinished:  # the phase completed (or the launch ended) before the kill landed: judged as finished
                log(f"[{nproc} proc] trial {row['trials']}: the phase finished before the SIGKILL ({aim}; launch exits "
                    f"{killed['codes']}); not counted, judged by its ledger and cache")
                after_phase = True
                break
            if killed["unproven"]:  # the phase unfinished, yet a process it was aimed at did not die by it
                raise AssertionError(f"{run.name}: {killed['unproven']}")
            tail = _log_tail(log_path, log0)
            if kind == "torchrun" and which is not None and f"Signal 9 (SIGKILL) received by PID {killed['targets'][0]}" not in tail:
                raise AssertionError(f"torchrun did not report the SIGKILL of worker {killed['targets'][0]}: {tail[-1500:]}")
            row["kills_sent"] += 1
            row["kills_proven"] += 1
            row["kills_by_aim"][aim] = row["kills_by_aim"].get(aim, 0) + 1
            if cycle and cycle[-1] == aim:
                cycle.pop()
            row["kills_by_launcher"][kind] = row["kills_by_launcher"].get(kind, 0) + 1
            if nproc > 1:
                row["single_rank_kills" if which is not None else "both_rank_kills"] += 1
            row["survivors_killed"] += killed["survivor_killed"]
            row["processes_killed"] += len(killed["targets"])
            row["workers_killed"] += len(killed["ranks"]) if nproc > 1 else 0
            row["kills_cache_partial"] += have < a.images
            row["window_kills"] += paid > have  # charged but not cached: what recovery must read back
            row["images_in_window"] += max(paid - have, 0)
            row["answers_recovered_logged"] += max([int(n) for n in re.findall(r"recovered (\d+) answers", tail)] or [0])
            log(f"[{nproc} proc] trial {row['trials']}: SIGKILL #{row['kills_sent']} ({kind}, {aim}"
                f"{f' {stop}' if stop else ''}, {'rank ' + str(which) if which is not None else 'every process'}) -> "
                f"{len(killed['targets'])} killed by SIGKILL (exit -9), all {len(killed['processes'])} gone "
                f"(pids {killed['processes']}), "
                f"launch exits {killed['codes']}"
                f"{', survivor killed' if killed['survivor_killed'] else ''}; ledger {paid}, cached {have} / {a.images}")
        try:
            code = 0 if after_phase else p.wait(900)
        except TimeoutError:
            kill_launch(p, None)
            code = -1
        tail = _log_tail(log_path, log0)
        row["answers_recovered_logged"] += max([int(n) for n in re.findall(r"recovered (\d+) answers", tail)] or [0])
        if code != 0:
            row["finished"] = False
            log(f"[{nproc} proc] trial {row['trials']}: the resumed run exited {code}: {tail.strip()[-800:]}")
            break
        out = json.loads((run / "query_phase.json").read_text())
        recovered = int(out.get("answers_recovered", 0))  # by the launch that finished (killed ones print none)
        row["answers_recovered_last_launch"] += recovered
        row["ledger_spent"] = spent(run)
        row["images_repaid"] += spent(run) - a.images
        same = cache_bytes(run) == ref_bytes
        row["cache_byte_equal"] &= same
        log(f"[{nproc} proc] trial {row['trials']} finished ({kind}): ledger {spent(run)} for {a.images} images, "
            f"{recovered} answers read back, cache byte-equal: {same}")
    row["kills"] = row["kills_proven"]
    row["start_s"] = {k: {"n": len(v), "median": statistics.median(v), "max": max(v)} for k, v in row["start_s"].items()}
    return row


def tiny_assets(work: Path, images: int, image_size: int) -> tuple[Path, Path]:
    """Default query shards of ``images`` images and a random tiny SimSiam victim (official format)."""
    import torch

    from stealer.shards import build_default_data
    from victims.simsiam import SimSiam, save_simsiam_checkpoint

    data = work / "data"
    if not (data / "animal_mnist" / "query" / "manifest.json").is_file():
        build_default_data(data, image_size=image_size, sizes={
            "animal_mnist": {"victim_train": 16, "query": images, "probe_train": 8, "probe_test": 8},
            "digits": {"probe_train": 8, "probe_test": 8}})
    victim = work / "victim.pth.tar"
    if not victim.is_file():
        torch.manual_seed(0)
        model = SimSiam("resnet18", dim=32, pred_dim=16, in_chans=1, width=8, stem="small")
        save_simsiam_checkpoint(model, victim, epoch=0, arch="resnet18", extra={"image_size": image_size})
    return data / "animal_mnist" / "query", victim


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/chaos_query", help="folder of the runs (each world size gets its own)")
    ap.add_argument("--data", default="", help="query shard folder ('' = tiny default data made in --work)")
    ap.add_argument("--victim", default="", help="victim checkpoint ('' = a tiny random SimSiam made in --work)")
    ap.add_argument("--images", type=int, default=400, help="images the steal queries (= its budget)")
    ap.add_argument("--batch", type=int, default=10, help="query.batch_size")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--kills", type=int, nargs="+", default=[50], help="proven kills per world size (one value, or one per --nproc)")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="world sizes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aims", default=",".join([*EXTERNAL, *POINTS]),
                    help="where kills land, taken in turn in a shuffled cycle: charge, uniform (seen from outside) and "
                         f"the points of the phase a forked rank stops at ({', '.join(POINTS)}); torchrun and exec "
                         "launches use the outside ones")
    ap.add_argument("--single", type=float, default=0.0,
                    help="share of the kills on several processes that kill one rank only (the other ends by itself); spread evenly, first kill first")
    ap.add_argument("--torchrun-kills", type=int, default=1,
                    help="proven kills of each multi-process world size made under torchrun (the rest: --launch)")
    ap.add_argument("--launch", choices=["fork", "exec"], default="fork",
                    help="fork this process into launch/steal.py's main, one child per rank with torchrun's "
                         "environment (fast), or exec fresh interpreters (python on 1 process, torchrun on several)")
    a = ap.parse_args(argv)
    if len(a.kills) not in (1, len(a.nproc)) or min(a.kills) < 1 or a.images < 1 or a.batch < 1:
        ap.error("--kills takes one value >= 1 or one per --nproc; --images and --batch must be >= 1")
    bad = [x for x in a.aims.split(",") if x.strip() and x.strip() not in (*EXTERNAL, *POINTS)]
    if bad or not a.aims.strip():
        ap.error(f"--aims: unknown {bad or 'empty'}; choose among {', '.join([*EXTERNAL, *POINTS])}")
    if not 0 <= a.single <= 1 or a.torchrun_kills < 0:
        ap.error("--single is a share in [0, 1]; --torchrun-kills must be >= 0")
    if a.launch == "exec":
        a.torchrun_kills = max(a.kills)  # every launch of several processes goes through torchrun
    a.work = os.path.abspath(a.work)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    if not a.data or not a.victim:
        data, victim = tiny_assets(Path(a.work), a.images, a.image_size)
        a.data, a.victim = a.data or str(data), a.victim or str(victim)
    if a.launch == "fork":  # imported once here, shared by every forked launch
        import accelerate  # noqa: F401
        import launch.common  # noqa: F401
        import launch.steal  # noqa: F401
        import stealer.steal  # noqa: F401
        import victims.api  # noqa: F401
        import victims.defenses  # noqa: F401
        import victims.simsiam  # noqa: F401
    rng = random.Random(a.seed)
    t0 = time.time()
    runs = {}
    for i, nproc in enumerate(a.nproc):
        runs[str(nproc)] = chaos(a, nproc, a.kills[i] if len(a.kills) > 1 else a.kills[0], rng)
    report = {"images": a.images, "batch": a.batch, "seconds": round(time.time() - t0, 1), "runs": runs}
    print(json.dumps(report, indent=1))
    for nproc, row in runs.items():
        print(f"{nproc} process(es): {row['kills']} proven SIGKILLs in the query phase ({row['window_kills']} left "
              f"{row['images_in_window']} images charged but not cached) over {row['trials']} runs -> images re-paid {row['images_repaid']} (target 0), "
              f"every run finished: {row['finished']}, cache byte-equal "
              f"to the uninterrupted run's: {row['cache_byte_equal']}; kills per aim {row['kills_by_aim']}, "
              f"per launcher {row['kills_by_launcher']}, start-up s {row['start_s']}")
    ok = all(r["images_repaid"] == 0 and r["finished"] and r["cache_byte_equal"] for r in runs.values())
    if not ok:
        sys.exit(1)
    return report


if __name__ == "__main__":
    status = 0
    try:
        main()
    except SystemExit as e:  # argparse's errors and a failed target
        status = e.code if isinstance(e.code, int) else (print(e.code, file=sys.stderr) or 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # every child is reaped; skip the ~4 s interpreter teardown that importing timm costs here
