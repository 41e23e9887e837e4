"""benchmarks/chaos_query.py at test size on 2 processes: SIGKILLs aimed at named points of the
query phase (a forked rank stops itself there, the kill comes from outside), one of them killing a
single rank; every kill proven, nothing re-paid, the cache byte-equal to an uninterrupted run's."""
from __future__ import annotations

from conftest import tiny_steal_assets

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SIZES = {"animal_mnist": {"victim_train": 16, "query": 64, "probe_train": 8, "probe_test": 8},
         "digits": {"probe_train": 8, "probe_test": 8}}


def _chaos_module():
    spec = importlib.util.spec_from_file_location("chaos_query", REPO / "benchmarks" / "chaos_query.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_stop_point_names_code_that_exists():
    """The points the chaos stops at follow the code: each names a function the query phase calls."""
    chaos = _chaos_module()
    for point, (module, attr, when) in chaos.POINTS.items():
        owner = importlib.import_module(module)
        for part in attr.split("."):
            owner = getattr(owner, part, None)
            assert owner is not None, f"{point}: {module}.{attr} is gone"
        assert callable(owner) and when in ("before", "after"), point


@pytest.mark.slow
def test_two_process_kills_at_named_points_repay_nothing(tmp_path):
    """2 processes (forked ranks with torchrun's environment), 2 proven SIGKILLs while a rank is
    stopped right after its charge committed (its answer kept, not cached) or inside a cache write
    (sidecar written, tar not): the first kills that rank alone (the other ends by itself at its
    next collective), the second both ranks. Then 0 images re-paid, the budget (= the images)
    suffices, the cache is byte-equal to the uninterrupted run's, and no killed process is left."""
    root, victim = tiny_steal_assets(tmp_path / "assets", SIZES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "chaos_query.py"), "--work", str(tmp_path / "w"),
                        "--data", str(root / "data" / "animal_mnist" / "query"), "--victim", str(victim),
                        "--images", "64", "--batch", "8", "--kills", "2", "--nproc", "2", "--torchrun-kills", "0",
                        "--aims", "charge.after,write.inside", "--single", "0.5", "--seed", "0"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    row = json.loads(r.stdout[r.stdout.index("{"):r.stdout.index("\n}") + 2])["runs"]["2"]
    assert row["kills"] == row["kills_proven"] == row["kills_sent"] == 2, row
    assert row["single_rank_kills"] == 1 and row["both_rank_kills"] == 1 and row["survivors_killed"] == 0, row
    assert sorted(row["kills_by_aim"]) == ["charge.after", "write.inside"] and row["kills_by_launcher"] == {"fork": 2}
    assert row["workers_killed"] == 3, row  # 1 rank, then 2 ranks, each ended by SIGKILL (the script checks -9)
    assert row["images_repaid"] == 0 and row["ledger_spent"] == row["images"] == 64, row
    assert row["cache_byte_equal"] and row["finished"], row
    # each kill: one line of the script, and the rank that stopped said where, in its run's log
    kills = [ln for ln in r.stderr.splitlines() if "SIGKILL #" in ln]
    assert len(kills) == 2 and all("exit -9" in ln and "gone" in ln for ln in kills), r.stderr[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "w").glob("chaos2-*.log"))
    stops = re.findall(r"chaos: rank (\d) stopped at (charge\.after|write\.inside) #\d+", logs)
    assert len(stops) >= 2 and {p for _, p in stops} == {"charge.after", "write.inside"}, logs[-2000:]
    # the charge.after kill left a charged answer uncached: the rerun read it back instead of buying it
    assert row["window_kills"] >= 1 and row["answers_recovered_logged"] >= 8, row
    # nothing the script killed is running now
    pids = [int(p) for ln in kills for p in re.findall(r"\d+", ln[ln.index("pids ["):ln.index("]", ln.index("pids ["))])]
    assert len(pids) >= 3 and not [p for p in pids if Path(f"/proc/{p}").exists()
                                   and Path(f"/proc/{p}/stat").read_text().split(") ")[1][0] not in "ZX"], pids
