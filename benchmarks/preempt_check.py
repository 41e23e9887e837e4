#!/usr/bin/env python
"""The per-step cost of the preemption check (stealer.preempt.Preemption.should_stop) on N processes:
an all-reduce + ``.item()`` on every step (check_every=1) against one in ``check_every`` steps.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/preempt_check.py --calls 3000

Prints, on rank 0, microseconds per call for each cadence (median of ``--repeats`` timings) and their ratio.
On CPU processes (gloo) this is the collective's latency; on GPUs the ``.item()`` also drains the
device queue every step, which is what the cadence spares the training loop.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--every", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--cpu", action="store_true", help="CPU processes even where GPUs are present")
    a = ap.parse_args()
    from stealer.dist import make_accelerator
    from stealer.preempt import Preemption

    acc = make_accelerator(cpu=a.cpu)
    run = Path(tempfile.mkdtemp(prefix="preempt_check"))
    per_call = {}
    for every in a.every:
        p = Preemption(run, acc, check_every=every)
        times = []
        for _ in range(a.repeats):
            acc.wait_for_everyone()
            t0 = time.perf_counter()
            for _ in range(a.calls):
                if p.should_stop():
                    raise SystemExit("a preemption request arrived during the measurement")
            times.append((time.perf_counter() - t0) / a.calls)
        p.close()
        per_call[every] = statistics.median(times)
    if acc.is_main_process:
        print(f"{acc.num_processes} process(es) on {acc.device}, {a.calls} calls x {a.repeats} repeats (median):")
        for every, t in per_call.items():
            print(f"  check_every={every:<3d} {t * 1e6:8.1f} us per step")
        base = per_call[a.every[0]]
        for every in a.every[1:]:
            print(f"  check_every={a.every[0]} / check_every={every}: {base / max(per_call[every], 1e-12):.1f}x")


if __name__ == "__main__":
    main()
