#!/usr/bin/env python
"""Where one 2-process torchrun start of the query phase spends its time (the cost of every killed
launch in ``benchmarks/chaos_query.py``): torchrun's agent until it spawns the workers, each
worker's ``import torch``, the rest of ``launch/steal.py``'s imports (timm, torchvision,
accelerate, the package), accelerate's set-up with the gloo rendezvous, the victim's load, the
first purchase, and the end of the run (the phase, then the interpreters' exit).

Prints one JSON line per rank (seconds since the launch) and the launch's total. The workers run
``launch/steal.py``'s ``main`` from this file (``--worker``), with its steps timed by wrapping
``make_accelerator``, ``check_inputs``, ``build_victim_api`` and ``ResponseCache.intend``.

    python benchmarks/torchrun_start.py --work runs/torchrun_start --repeat 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

T = {"interpreter": time.time()}
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def worker(argv: list[str]) -> None:
    """A torchrun worker: launch/steal.py's main with each start-up step's wall-clock time recorded."""
    import torch  # noqa: F401

    T["import torch"] = time.time()
    import launch.steal as entry
    from stealer.cache import ResponseCache

    T["import launch.steal"] = time.time()

    def timed(name: str, fn):
        def run(*a, **k):
            T[f"{name} begin"] = time.time()
            out = fn(*a, **k)
            T[f"{name} end"] = time.time()
            return out
        return run

    for name in ("make_accelerator", "check_inputs", "build_victim_api"):
        setattr(entry, name, timed(name, getattr(entry, name)))
    intend = ResponseCache.intend

    def first_intend(self, *a, **k):
        T.setdefault("first purchase journaled", time.time())
        return intend(self, *a, **k)

    ResponseCache.intend = first_intend
    try:
        entry.main(argv)
    finally:
        T["main returned"] = time.time()
        Path(f"{os.environ['TORCHRUN_START_OUT']}.r{os.environ.get('RANK', '0')}.json").write_text(json.dumps(T))


def main(argv: list[str] | None = None) -> list[dict]:
    import chaos_query as chaos

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/torchrun_start")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args(argv)
    if a.repeat < 1 or a.images < 1 or a.batch < 1:
        ap.error("--repeat, --images and --batch must be >= 1")
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, victim = chaos.tiny_assets(work, a.images, a.image_size)
    out = []
    for i in range(a.repeat):
        name = f"start{i}-{int(time.time())}"
        args = [f"out_dir={work}", f"name={name}", "cpu=true", "phases=[query]", f"victim.checkpoint={victim}",
                f"data.query={data}", f"data.image_size={a.image_size}", f"query.batch_size={a.batch}",
                f"query.num_queries={a.images}", f"victim.budget={a.images}"]
        env = {**chaos.child_env(), "TORCHRUN_START_OUT": str(work / name)}
        t0 = time.time()
        with open(work / f"{name}.log", "w") as logf:
            p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                                  str(chaos.free_port()), __file__, "--worker", *args], env=env, stdout=logf, stderr=logf)
        spawned = None
        while p.poll() is None:
            if spawned is None and len(chaos._children_map().get(p.pid, [])) >= 2:
                spawned = time.time() - t0
            time.sleep(0.005)
        if p.returncode != 0:
            raise SystemExit(f"the launch failed (exit {p.returncode}): {(work / f'{name}.log').read_text()[-1500:]}")
        row = {"launch_s": round(time.time() - t0, 2), "workers_spawned_s": round(spawned or -1, 2)}
        for r in (0, 1):
            marks = json.loads((work / f"{name}.r{r}.json").read_text())
            row[f"rank{r}"] = {k: round(v - t0, 2) for k, v in sorted(marks.items(), key=lambda kv: kv[1])}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        main()
