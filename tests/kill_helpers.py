"""Kill a run with every process it started (DataLoader workers, torchrun workers in their own
sessions) and prove that they are gone."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(rest[1]), rest[0]


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (by parent links, whatever session or group it is in)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _ppid_and_state(int(entry))
            if info is not None:
                children.setdefault(info[0], []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has stopped running)."""
    info = _ppid_and_state(pid)
    return info is not None and info[1] != "Z"


def kill_tree(proc: subprocess.Popen, timeout: float = 30) -> list[int]:
    """SIGKILL ``proc`` and all its descendants at once; wait until none runs; return their pids."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=timeout)
    t0 = time.time()
    while any(alive(p) for p in pids):
        assert time.time() - t0 < timeout, f"still running after SIGKILL: {[p for p in pids if alive(p)]}"
        time.sleep(0.05)
    return pids
