"""The attacks beyond direct extraction (stealer/attacks.py): their losses against hand-computed
values, views that the train phase rebuilds bitwise, every attack end to end on 2 CPU processes
charging the ledger exactly what it declares (and nothing on a rerun), and exact resume of a
multi-view, two-stage attack."""
from __future__ import annotations

from conftest import free_port

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stealer.attacks import (ENCODER_ATTACKS, contsteal_loss, mismatch_nce, ntxent, queries_per_image, rda_loss,
                             stolenencoder_loss)
from stealer.augment import keyed_views
from stealer.config import ConfigError, load_config
from stealer.steal import StealConfig

REPO = Path(__file__).resolve().parents[1]
SIZES = {"animal_mnist": {"victim_train": 16, "query": 48, "probe_train": 16, "probe_test": 16},
         "digits": {"probe_train": 16, "probe_test": 16}}
# small settings per attack (views/k scaled down from the papers' defaults to keep the test fast)
SETTINGS = {"direct": [], "stolenencoder": ["attack.k=2"], "contsteal": ["attack.views=2"],
            "head_recreation": ["attack.head_epochs=1", "attack.head_dim=8"], "rda": ["attack.views=3", "attack.k=2"]}
SPEND = {"direct": 1, "stolenencoder": 1, "contsteal": 2, "head_recreation": 2, "rda": 3}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from stealer.shards import build_default_data
    from victims.simsiam import SimSiam, save_simsiam_checkpoint

    root = tmp_path_factory.mktemp("attacks")
    build_default_data(root / "data", image_size=16, sizes=SIZES)
    torch.manual_seed(0)
    victim = root / "victim.pth.tar"
    save_simsiam_checkpoint(SimSiam("resnet18", dim=32, pred_dim=16, in_chans=1, width=8, stem="small"), victim,
                            epoch=0, arch="resnet18", extra={"image_size": 16})
    return root, victim


def _args(root: Path, victim: Path, out: Path, name: str, attack: str) -> list[str]:
    """A tiny steal of ``attack`` on the fixture's data, written to ``out/name``."""
    return [f"out_dir={out}", f"name={name}", "cpu=true", f"victim.checkpoint={victim}",
            f"data.query={root}/data/animal_mnist/query", "data.image_size=16", "student.width=8", "train.epochs=1",
            "train.batch_size=16", "train.log_every=1", "query.batch_size=20", f"attack.name={attack}", *SETTINGS[attack]]


def _spent(run: Path) -> int:
    from victims.ledger import QueryLedger

    return QueryLedger(run / "victim_state" / "ledger.sqlite").spent("attacker")


# -- the maths ---------------------------------------------------------------------------------------
def test_stolenencoder_loss_hand_value():
    raw = torch.tensor([[3.0, 0.0]])  # normalised (1, 0); the target normalises to (0, 1)
    views = [torch.tensor([[0.0, 5.0]]), torch.tensor([[-1.0, 0.0]])]  # distances 0 and sqrt(2)
    loss = stolenencoder_loss(raw, views, torch.tensor([[0.0, 2.0]]), lam=2.0)
    assert loss.item() == pytest.approx(math.sqrt(2) + 2.0 / 2 * (0 + math.sqrt(2)), abs=1e-5)
    assert stolenencoder_loss(raw, [], torch.tensor([[0.0, 2.0]]), lam=2.0).item() == pytest.approx(math.sqrt(2), abs=1e-5)


def test_mismatch_nce_and_contsteal_hand_values():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # row 0: pos s0.t0 = 1, negatives s0.t1 = 1, s0.s1 = 0; row 1: pos 0, negatives s1.t0 = 0, s1.s0 = 0
    expected = ((math.log(math.e + 1) - 1) + math.log(2)) / 2
    assert mismatch_nce(s, t, temperature=1.0).item() == pytest.approx(expected, abs=1e-6)
    assert contsteal_loss(3 * s, 2 * t, temperature=1.0).item() == pytest.approx(expected, abs=1e-6)  # normalised
    t2 = 0.5 * t  # temperature divides every similarity
    assert mismatch_nce(s, t2, temperature=0.5).item() == pytest.approx(expected, abs=1e-6)


def test_rda_loss_hand_values():
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # normalises to e1, e2
    p = torch.tensor([[0.5, 0.0], [0.0, -1.0]])
    # align row 0: cos 1, |e1 - p0|^2 = 0.25 ; row 1: cos -1, |e2 - p1|^2 = 4
    eps = 1e-6
    align = ((math.log(0.25 + eps) - math.log(2 + eps)) + (math.log(4 + eps) - math.log(0 + eps))) / 2
    assert rda_loss(s, p, temperature=1.0, alpha=0.0, beta=1.0).item() == pytest.approx(align, rel=1e-5)
    nce = mismatch_nce(F.normalize(s, dim=-1), p, temperature=1.0).item()
    # row 0: pos 0.5, negatives s0.p1 = 0, s0.s1 = 0; row 1: pos -1, negatives s1.p0 = 0, s1.s0 = 0
    assert nce == pytest.approx(((math.log(2) - 0.5) + (math.log(2) + 1)) / 2, abs=1e-6)
    both = rda_loss(s, p, temperature=1.0, alpha=2.0, beta=0.5).item()
    assert both == pytest.approx(2.0 * nce + 0.5 * align, rel=1e-5)


def test_ntxent_hand_value_and_simclr_reference():
    z = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    # every anchor: its positive at similarity 1, the two others at 0
    assert ntxent(z, temperature=1.0).item() == pytest.approx(math.log(math.e + 2) - 1, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 2, 5, generator=g)
    # SimCLR's NT-Xent as cross-entropy over the 2N-1 other rows
    h = F.normalize(torch.cat([z[:, 0], z[:, 1]]), dim=1)
    logits = h @ h.T / 0.3
    logits.fill_diagonal_(float("-inf"))
    labels = torch.cat([torch.arange(6, 12), torch.arange(0, 6)])
    assert ntxent(z, temperature=0.3).item() == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-5)
    with pytest.raises(ValueError, match="at least 2 views"):
        ntxent(z[:, :1], temperature=0.3)


def test_keyed_views_are_a_function_of_seed_key_and_view():
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8, generator=g)
    keys = ["a", "b", "c", "d"]
    v0 = keyed_views(imgs, keys, 0, 0)
    assert v0.dtype == torch.uint8 and v0.shape == imgs.shape
    # the same image gets the same view in another batch, position or order
    assert torch.equal(keyed_views(imgs[[2, 0]], ["c", "a"], 0, 0), v0[[2, 0]])
    assert not torch.equal(keyed_views(imgs, keys, 0, 1), v0)  # another view
    assert not torch.equal(keyed_views(imgs, keys, 1, 0), v0)  # another seed


# -- configuration ------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,match", [
    ("attack.name=foo", "attack.name='foo' is not valid; choose one of: direct, head_recreation, stolenencoder, contsteal, rda"),
    ("attack.views=0", "attack.views=0 is out of range; set attack.views to a value >= 1"),
    ("attack.temperature=0", r"attack.temperature=0.0 is out of range; set attack.temperature to a value > 0"),
])
def test_attack_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(StealConfig, None, [override])


def test_declared_spend_per_attack():
    for name in ENCODER_ATTACKS:
        cfg = load_config(StealConfig, None, [f"attack.name={name}"])
        assert queries_per_image(cfg.attack) == {"direct": 1, "stolenencoder": 1, "contsteal": 1,
                                                 "head_recreation": 2, "rda": 10}[name]
    assert queries_per_image(load_config(StealConfig, None, ["attack.name=rda", "attack.views=4"]).attack) == 4
    with pytest.raises(ConfigError, match="queries each image once, raw"):
        load_config(StealConfig, None, ["attack.name=stolenencoder", "attack.views=3"])


# -- the engine ---------------------------------------------------------------------------------------
def test_cached_views_are_what_the_victim_saw_and_caches_do_not_mix(setup, tmp_path):
    """The train phase rebuilds each paid view bitwise: the cached response of view v of image k
    is the victim's answer to keyed_views(image k, v). A cache of other views is refused."""
    from launch.common import build_victim_api, make_accelerator
    from stealer.data import ShardStream, open_shards
    from stealer.steal import run_query_phase, run_train_phase
    from victims.simsiam import load_victim_encoder

    root, victim = setup
    cfg = load_config(StealConfig, None, _args(root, victim, tmp_path, "v", "contsteal"))
    acc = make_accelerator(cpu=True)
    out = run_query_phase(cfg, build_victim_api(cfg.victim, cfg.run_dir), acc)
    assert out["queries_sent"] == out["declared_queries"] == out["ledger_spent"] == 2 * 48
    enc = load_victim_encoder(victim)
    batch = next(iter(ShardStream(open_shards(cfg.run_dir / "cache"), batch_size=8, channels=1, image_size=16,
                                  shuffle=False).iter_epoch(0)))
    assert batch["response"].shape == (8, 2, enc.out_dim)
    for v in range(2):
        seen = enc(keyed_views(batch["image"], batch["key"], cfg.seed, v))
        assert torch.allclose(batch["response"][:, v], seen, atol=1e-5)
    assert not torch.allclose(batch["response"][:, 0], batch["response"][:, 1])
    other = load_config(StealConfig, None, _args(root, victim, tmp_path, "v", "rda"))
    with pytest.raises(ValueError, match="holds views .* but attack.name=rda needs"):
        run_train_phase(other, acc)
    with pytest.raises(ValueError, match="was made with other settings"):
        run_query_phase(other, build_victim_api(other.victim, other.run_dir), acc)


DRIVER = """
import json, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from launch.common import build_victim_api, make_accelerator
from launch.steal import main
from stealer.config import load_config
from stealer.steal import StealConfig, run_query_phase, run_train_phase

runs = json.loads(Path(sys.argv[1]).read_text())
acc = make_accelerator(cpu=True)
out = {{}}
for name, args in runs[:-1]:
    cfg = load_config(StealConfig, None, args)
    api = build_victim_api(cfg.victim, cfg.run_dir)
    first = run_query_phase(cfg, api, acc)
    again = run_query_phase(cfg, api, acc)  # everything is cached: nothing is paid twice
    out[name] = {{"world": acc.num_processes, "query": first, "again": again["queries_sent"],
                 "train": run_train_phase(cfg, acc)}}
if acc.is_main_process:
    Path(sys.argv[2]).write_text(json.dumps(out))
main(runs[-1][1])  # the last attack through the entry point (writes steal.json; ends the process group)
"""


@pytest.mark.slow
def test_every_attack_one_epoch_on_two_processes_charges_what_it_declares(setup, tmp_path):
    root, victim = setup
    runs = [(a, _args(root, victim, tmp_path, a, a)) for a in ["direct", "stolenencoder", "contsteal", "head_recreation", "rda"]]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(driver), str(tmp_path / "runs.json"), str(tmp_path / "out.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    for name, r in out.items():
        assert r["world"] == 2, name
        q = r["query"]
        assert q["queries_per_image"] == SPEND[name] and q["cached"] == 48, (name, q)
        assert q["queries_sent"] == q["declared_queries"] == q["ledger_spent"] == SPEND[name] * 48, (name, q)
        assert r["again"] == 0 and _spent(tmp_path / name) == SPEND[name] * 48, name
        steps = 2 * (2 if name == "head_recreation" else 1)  # 48 images / (2 ranks x 16) = 2 steps per epoch
        assert r["train"]["steps"] == steps and math.isfinite(r["train"]["final_loss"]), (name, r["train"])
        assert (tmp_path / name / "student.pt").is_file()
    steal = json.loads((tmp_path / "rda" / "steal.json").read_text())
    assert steal["world_size"] == 2 and steal["train"]["attack"] == "rda"
    assert steal["query"]["declared_queries"] == steal["query"]["ledger_spent"] == _spent(tmp_path / "rda") == 3 * 48
    from stealer.student import load_student

    assert load_student(tmp_path / "head_recreation" / "student.pt").meta["out_dim"] == 8  # the recreated head's size


def test_head_recreation_resumes_bitwise_in_either_stage(setup, tmp_path):
    """Resuming from a checkpoint in the head stage or in the student stage ends with bitwise the
    student (and head) of an uninterrupted run, and spends no query."""
    from launch.common import build_victim_api, make_accelerator
    from stealer.ckpt import load_checkpoint
    from stealer.steal import run_query_phase, run_train_phase

    root, victim = setup
    base = _args(root, victim, tmp_path, "hr", "head_recreation") + ["train.epochs=2", "train.ckpt_every=2", "train.keep=20"]
    acc = make_accelerator(cpu=True)
    cfg = load_config(StealConfig, None, base + ["resume=none"])
    run_query_phase(cfg, build_victim_api(cfg.victim, cfg.run_dir), acc)
    full = run_train_phase(cfg, acc)
    assert full["steps"] == 3 * 3  # 48 images / 16 = 3 steps per epoch; 1 head epoch + 2 student epochs
    ref = torch.load(cfg.run_dir / "student.pt", weights_only=True)["state_dict"]
    ref_head = load_checkpoint(cfg.run_dir / "ckpt" / "ckpt-000000009.pt")["attack_state"]["head"]
    mid = {s: cfg.run_dir / "ckpt" / f"ckpt-{s:09d}.pt" for s in (2, 4)}  # step 2: head stage; step 4: student stage
    assert load_checkpoint(mid[2])["epoch"] == 0 and load_checkpoint(mid[4])["epoch"] == 1
    for s, path in mid.items():
        again = run_train_phase(load_config(StealConfig, None, base + [f"resume={path}"]), acc)
        assert again["steps"] == 9
        got = torch.load(cfg.run_dir / "student.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(ref[k], got[k]) for k in ref), f"resumed from step {s}: student differs"
        head = load_checkpoint(cfg.run_dir / "ckpt" / "ckpt-000000009.pt")["attack_state"]["head"]
        assert all(torch.equal(ref_head[k], head[k]) for k in ref_head), f"resumed from step {s}: head differs"
    assert _spent(cfg.run_dir) == 2 * 48
