"""A rerun after launch/attack_curves.py's library moved to eval/attack_curves.py reuses every finished cell.

A cell is reused when its run folder (the row's tag) holds ``student.pt`` + ``steal.json`` (and its probe records):
so every row the old module planned for a shipped config must still be planned, under the same tag, with the same
fields (steal argv, query folder, budget, images, seed, lr, control). tests/data/curves_plan_golden.json holds what
the old module planned (tag + sha256 of the row's fields) for each shipped curves config; rows added since are
allowed, a changed or missing one is not (a rerun would steal it again, paying its queries twice).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from eval.attack_curves import CurvesConfig, Row, plan_rows
from stealer.config import load_config

REPO = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((REPO / "tests" / "data" / "curves_plan_golden.json").read_text())["configs"]


def _fingerprint(r: Row) -> str:
    fields = {"label": r.label, "attack": r.attack, "budget": r.budget, "images": r.images, "per_image": r.per_image,
              "tag": r.tag, "run_dir": str(r.run_dir), "steal_argv": r.steal_argv, "query_dir": r.query_dir,
              "source": r.source, "seed": r.seed, "lr": r.lr, "control": r.control, "base": r.base}
    return f"{r.tag} {hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]}"


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_shipped_configs_plan_the_cells_the_old_module_planned(name, monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped configs name their files relative to the repository
    cfg = load_config(CurvesConfig, REPO / "launch" / "configs" / name)
    want = GOLDEN[name]
    assert want["unchosen"] and want["chosen"]
    for kind, rows in [("select", plan_rows(cfg, select=True)), ("unchosen", plan_rows(cfg)),
                       ("chosen", plan_rows(cfg, want["choice"]))]:
        got = {_fingerprint(r) for r in rows}
        lost = [w for w in want[kind] if w not in got]
        assert not lost, f"{name} ({kind}): {len(lost)} cells of the old plan are gone or changed, e.g. {lost[:3]}"


def test_fingerprint_tells_a_changed_cell(monkeypatch):
    """The check can fail: an argument more, or another seed, gives another fingerprint for the same tag."""
    monkeypatch.chdir(REPO)
    cfg = load_config(CurvesConfig, REPO / "launch" / "configs" / "curves_seeds.yaml")
    r = plan_rows(cfg)[0]
    assert _fingerprint(r) in GOLDEN["curves_seeds.yaml"]["unchosen"]
    changed = load_config(CurvesConfig, REPO / "launch" / "configs" / "curves_seeds.yaml", ["steal_args=[train.lr=0.1]"])
    assert _fingerprint(plan_rows(changed)[0]) not in GOLDEN["curves_seeds.yaml"]["unchosen"]
    assert plan_rows(changed)[0].tag == r.tag  # same folder, other steal: exactly what reuse must not meet
