#!/usr/bin/env python
"""Chaos on the query phase: SIGKILLs at random moments of ``launch/steal.py phases=[query]`` on 1
and 2 processes (torchrun), each followed by ``--resume auto``, with the budget equal to the
number of images.

Prints a JSON block, then one line per world size: kills sent and proven, images re-paid (target
0), whether every run finished (a re-paid image would exhaust the budget: exit 2), and whether
the final cache is byte-equal to an uninterrupted run's (every ``resp-*.tar`` and sidecar, and the
manifest but for its ``created`` time).

A kill is *proven* when the launcher was alive (and, on 2 processes, both workers were found
among its descendants) at the moment it was sent, the launcher exited by SIGKILL (-9), every
worker PID is gone afterwards (torchrun starts its workers in their own sessions, so killing its
process group would miss them: each descendant is killed by PID, found through ``/proc``), and
the cache was partial after the kill (fewer images cached than the run needs). Only proven kills
count towards ``--kills``. Half of the kills (``--aimed``) are sent the moment the ledger shows a
random later charge of this launch (polled every millisecond), the rest at a uniform random
moment of what is left of the phase. ``window_kills`` counts kills that left images charged but not yet
cached: the window that cost 10-20 re-paid images per kill before the victim kept answers with
their charges.

Launches: with ``--launch fork`` (default) a 1-process run is a fork of this already-imported
script calling ``launch/steal.py``'s ``main`` (a real process and entry point, without ~5-10 s of
imports per launch), and the uninterrupted 2-process reference is two forked ranks with
torchrun's environment; every killed (and resumed) 2-process run goes through torchrun.

    python benchmarks/chaos_query.py --kills 50 --nproc 1 2          # ~50 kills per world size
    python benchmarks/chaos_query.py --images 96 --batch 8 --kills 4 2 --nproc 1 2   # the test's size
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------- processes
def _stat(pid: int) -> tuple[int, str] | None:
    """``(ppid, state)`` of a live PID from /proc, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), fields[0]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie (``Z``) or dead (``X``) process is not alive."""
    st = _stat(pid)
    return st is not None and st[1] not in ("Z", "X")


def kill_tree(proc: subprocess.Popen, timeout: float = 10.0) -> list[int]:
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
    deadline = time.time() + timeout
    while any(alive(p) for p in victims):
        if time.time() > deadline:
            raise AssertionError(f"processes {[p for p in victims if alive(p)]} survived SIGKILL")
        time.sleep(0.02)
    return victims


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


class ForkedGroup:
    """``nproc`` forked ranks with the environment torchrun gives its workers (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT, ...): the uninterrupted reference run, without torchrun's start-up. The
    killed runs always go through torchrun. ``wait`` returns the first non-zero rank exit."""

    def __init__(self, nproc: int, argv: list[str], log_path: Path) -> None:
        port = str(free_port())
        self.ranks = [Forked(argv, log_path, {
            "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_RANK": "0", "ROLE_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            for r in range(nproc)]

    def wait(self, timeout: float | None = None) -> int:
        codes = [p.wait(timeout) for p in self.ranks]
        return next((c for c in codes if c != 0), 0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- the run
def steal_args(a: argparse.Namespace, name: str) -> list[str]:
    return [f"out_dir={a.work}", f"name={name}", "cpu=true", "phases=[query]", f"victim.checkpoint={a.victim}",
            f"data.query={a.data}", f"data.image_size={a.image_size}", f"query.batch_size={a.batch}",
            f"query.num_queries={a.images}", f"victim.budget={a.images}", "--resume", "auto"]


def launch(a: argparse.Namespace, name: str, nproc: int) -> Any:
    """Start the steal ``name`` on ``nproc`` processes, its output appended to ``<work>/<name>.log``:
    torchrun for several, a fork of this process (``--launch fork``) or a fresh interpreter for one."""
    log_path = Path(a.work) / f"{name}.log"
    if nproc == 1 and a.launch == "fork":
        return Forked(steal_args(a, name), log_path)
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    with open(log_path, "ab") as logf:
        return subprocess.Popen(launcher + [str(REPO / "launch" / "steal.py"), *steal_args(a, name)], env=env(),
                                stdout=logf, stderr=logf, start_new_session=True)


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


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def chaos(a: argparse.Namespace, nproc: int, kills: int, rng: random.Random) -> dict:
    ref = Path(a.work) / f"ref{nproc}"
    t0 = time.time()
    first = ForkedGroup(nproc, steal_args(a, ref.name), Path(a.work) / f"{ref.name}.log") \
        if nproc > 1 and a.launch == "fork" else launch(a, ref.name, nproc)
    if first.wait(900) != 0:
        raise SystemExit(f"the uninterrupted run failed: {(ref.parent / f'{ref.name}.log').read_text()[-2000:]}")
    phase_s = json.loads((ref / "query_phase.json").read_text())["seconds"]
    log(f"[{nproc} proc] uninterrupted run: {time.time() - t0:.1f} s wall, query phase {phase_s:.2f} s")
    ref_bytes = cache_bytes(ref)
    row = {"nproc": nproc, "images": a.images, "kills": 0, "kills_sent": 0, "kills_proven": 0, "window_kills": 0,
           "images_in_window": 0, "workers_killed": 0, "trials": 0, "relaunches": 0, "images_repaid": 0,
           "answers_recovered_last_launch": 0,
           "finished": True, "cache_byte_equal": True, "ledger_spent": 0, "reference_phase_s": round(phase_s, 3)}
    while row["kills_proven"] < kills:
        row["trials"] += 1
        run = Path(a.work) / f"chaos{nproc}-{row['trials']}"
        while True:  # one trial: kill at random moments until a launch finishes by itself
            row["relaunches"] += 1
            start = journal_size(run)
            p = launch(a, run.name, nproc)
            # the query phase has begun buying when this launch appends to the journal
            while p.poll() is None and journal_size(run) <= start:
                time.sleep(0.005)
            left = max(a.images - cached(run), 0)
            if rng.random() < a.aimed:  # right after the j-th charge of this launch commits: the window
                target = spent(run) + a.batch * rng.randint(1, max(-(-left // a.batch), 1))
                while p.poll() is None and spent(run) < target:
                    time.sleep(0.001)
            else:  # a random moment of what is left of the phase
                time.sleep(rng.uniform(0, phase_s * left / a.images))
            workers = [w for w in descendants(p.pid) if alive(w)]
            if p.poll() is not None or kills <= row["kills_proven"] or len(workers) < nproc - (nproc == 1):
                break  # finished, finishing (a worker has exited) or enough kills: let it end by itself
            killed = kill_tree(p)
            if p.returncode != -signal.SIGKILL:  # it ended by itself just before the kill: judged below
                log(f"[{nproc} proc] trial {row['trials']}: the launch ended (exit {p.returncode}) before the SIGKILL")
                break
            row["kills_sent"] += 1
            row["workers_killed"] += len(killed) if nproc > 1 else 0
            if not all(not alive(w) for w in workers):
                raise AssertionError("a worker survived")
            paid, have = spent(run), cached(run)
            if have < a.images:  # the kill landed in the query phase: the cache is partial
                row["kills_proven"] += 1
                row["window_kills"] += paid > have  # charged but not cached: what recovery must read back
                row["images_in_window"] += max(paid - have, 0)
            log(f"[{nproc} proc] trial {row['trials']}: SIGKILL #{row['kills_sent']} -> {len(killed)} descendants "
                f"gone, exit {p.returncode}; ledger {paid}, cached {have} / {a.images}"
                + ("" if have < a.images else " (after the phase: not counted)"))
        if p.wait(900) != 0:
            row["finished"] = False
            err = (run.parent / f"{run.name}.log").read_text()
            log(f"[{nproc} proc] trial {row['trials']}: the resumed run exited {p.returncode}: {err.strip()[-500:]}")
            break
        out = json.loads((run / "query_phase.json").read_text())
        recovered = int(out.get("answers_recovered", 0))  # by the launch that finished (killed ones print none)
        row["answers_recovered_last_launch"] += recovered
        row["ledger_spent"] = spent(run)
        row["images_repaid"] += spent(run) - a.images
        same = cache_bytes(run) == ref_bytes
        row["cache_byte_equal"] &= same
        log(f"[{nproc} proc] trial {row['trials']} finished: ledger {spent(run)} for {a.images} images, "
            f"{recovered} answers read back, cache byte-equal: {same}")
    row["kills"] = row["kills_proven"]
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
    ap.add_argument("--aimed", type=float, default=0.5,
                    help="share of the kills sent right after a charge commits (the rest at uniform random moments)")
    ap.add_argument("--launch", choices=["fork", "exec"], default="fork",
                    help="1 process, and the 2-process reference run: fork this process into launch/steal.py's main "
                         "(fast) or exec a fresh python (torchrun); killed runs of several processes always use torchrun")
    a = ap.parse_args(argv)
    if len(a.kills) not in (1, len(a.nproc)) or min(a.kills) < 1 or a.images < 1 or a.batch < 1:
        ap.error("--kills takes one value >= 1 or one per --nproc; --images and --batch must be >= 1")
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
              f"to the uninterrupted run's: {row['cache_byte_equal']}")
    ok = all(r["images_repaid"] == 0 and r["finished"] and r["cache_byte_equal"] for r in runs.values())
    if not ok:
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
