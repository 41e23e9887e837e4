"""The steal entry point against a real HTTP victim server: `victim.url=... victim.api_key_file=...`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_steal_query_phase_over_http(tmp_path):
    from stealer.shards import build_default_data
    from victims.api import VictimAPI
    from victims.ledger import QueryLedger
    from victims.server import add_user, create_app, start_server_thread, state_paths
    from victims.simsiam import SimSiam, load_victim_encoder, save_simsiam_checkpoint

    build_default_data(tmp_path / "data", image_size=16,
                       sizes={"animal_mnist": {"victim_train": 8, "query": 96, "probe_train": 8, "probe_test": 8},
                              "digits": {"probe_train": 8, "probe_test": 8}})
    torch.manual_seed(0)
    ckpt = tmp_path / "victim.pth.tar"
    save_simsiam_checkpoint(SimSiam("resnet18", dim=32, pred_dim=16, in_chans=1, width=8, stem="small"), ckpt,
                            epoch=0, arch="resnet18", extra={"image_size": 16})
    keys_db, ledger_db = state_paths(tmp_path / "server")
    keys_db.parent.mkdir(parents=True)
    ledger = QueryLedger(ledger_db)
    key = add_user(keys_db, "alice", 96, ledger=ledger)
    (tmp_path / "alice.key").write_text(key + "\n")
    api = VictimAPI(load_victim_encoder(ckpt), ledger)
    server, thread, url = start_server_thread(create_app(api, keys_db=keys_db))
    try:
        cmd = [sys.executable, str(REPO / "launch" / "steal.py"), f"out_dir={tmp_path}", "name=h", "cpu=true",
               "phases=[query]", f"victim.url={url}", f"victim.api_key_file={tmp_path / 'alice.key'}",
               "victim.user=alice", f"data.query={tmp_path}/data/animal_mnist/query", "data.image_size=16",
               "query.batch_size=32"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for expected_sent in (96, 0):  # the rerun is served from the cache: nothing is paid twice
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
            assert r.returncode == 0, r.stderr[-3000:]
            out = json.loads((tmp_path / "h" / "steal.json").read_text())["query"]
            assert out["queries_sent"] == expected_sent and out["ledger_spent"] == 96 and out["cached"] == 96
        assert ledger.spent("alice") == 96
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    # the server is gone: a one-line error naming the URL and the fix, exit status 2
    r = subprocess.run(cmd + ["name=h2", "victim.max_retries=1"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "launch/serve.py" in r.stderr.strip().splitlines()[-1]
