"""Evaluation extras: weighted kNN, rank correlation and prediction agreement, accuracy-vs-queries report."""

from __future__ import annotations

from conftest import free_port

import csv
import json
import math
import os
import threading
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from eval.curves import RecordError, build_tables, load_records, write_curves
from eval.knn import knn_classify, knn_predict
from eval.metrics import average_ranks, fidelity, prediction_agreement, rank_correlation, spearman

DATA = Path(__file__).parent / "data" / "curves_results.jsonl"


def _unit(deg: float) -> list[float]:
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


def _cos(deg: float) -> float:
    return math.cos(math.radians(deg))


# ---------------------------------------------------------------------------------------------
# kNN


def _clusters(seed: int = 0, n_train: int = 30, n_test: int = 11, classes: int = 3, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(dim)[:classes] * 10
    ytr = torch.arange(classes).repeat_interleave(n_train)
    yte = torch.arange(classes).repeat_interleave(n_test)
    xtr = centers[ytr] + torch.randn(len(ytr), dim, generator=g)
    xte = centers[yte] + torch.randn(len(yte), dim, generator=g)
    perm = torch.randperm(len(ytr), generator=g)
    return xtr[perm], ytr[perm], xte, yte


@pytest.mark.parametrize("weighted", [True, False])
def test_knn_separated_clusters_are_perfect(weighted: bool) -> None:
    xtr, ytr, xte, yte = _clusters()
    res = knn_classify(xtr, ytr, xte, yte, k=5, weighted=weighted, return_predictions=True)
    assert res["top1"] == 1.0 and res["n_test"] == len(yte) and res["k"] == 5
    assert math.isnan(res["top5"])  # 3 classes: no top-5
    assert torch.equal(res["predictions"], yte)
    small = knn_classify(xtr, ytr, xte, yte, k=5, weighted=weighted, test_chunk=4, train_chunk=7)
    assert small["top1"] == 1.0


def test_knn_hand_computed_votes() -> None:
    # train: class 0 at 0° and 180°, class 1 at 50° and 60°; k = 3
    xtr = torch.tensor([_unit(0), _unit(180), _unit(50), _unit(60)]) * torch.tensor([[1.0], [2.0], [3.0], [0.5]])
    ytr = torch.tensor([0, 0, 1, 1])
    xte = torch.tensor([_unit(0), _unit(55)]) * 4.0  # scale is irrelevant: cosine on unit vectors
    yte = torch.tensor([0, 1])
    # test 0: neighbours 0° (cos 1, class 0), 50° (class 1), 60° (class 1); 180° is left out
    # test 1: neighbours 50° and 60° (cos 5°, class 1) and 0° (cos 55°, class 0)
    T = 1.0
    expected = torch.tensor([[math.exp(1.0), math.exp(_cos(50) / T) + math.exp(_cos(60) / T)],
                             [math.exp(_cos(55) / T), 2 * math.exp(_cos(5) / T)]])
    norm = torch.nn.functional.normalize
    votes = knn_predict(norm(xtr, dim=1), ytr, norm(xte, dim=1), num_classes=2, k=3, temperature=T)
    torch.testing.assert_close(votes, expected.float(), rtol=1e-5, atol=1e-6)
    # T = 1: e^1 = 2.718 < e^0.643 + e^0.5 = 3.551 → test 0 is called class 1 (wrong); test 1 right
    assert knn_classify(xtr, ytr, xte, yte, k=3, temperature=1.0)["top1"] == 0.5
    # T = 0.07: e^(1/0.07) dwarfs e^(0.643/0.07) + e^(0.5/0.07) → test 0 is class 0; both right
    assert knn_classify(xtr, ytr, xte, yte, k=3, temperature=0.07)["top1"] == 1.0
    # unweighted majority: 2 votes for class 1 at test 0
    res = knn_classify(xtr, ytr, xte, yte, k=3, weighted=False, return_predictions=True)
    assert res["top1"] == 0.5 and res["predictions"].tolist() == [1, 1]
    votes_u = knn_predict(norm(xtr, dim=1), ytr, norm(xte, dim=1), num_classes=2, k=3, weighted=False)
    assert votes_u.tolist() == [[1.0, 2.0], [1.0, 2.0]]
    # the chunked top-k merge finds the same neighbours
    votes_c = knn_predict(norm(xtr, dim=1), ytr, norm(xte, dim=1), num_classes=2, k=3, temperature=T,
                          test_chunk=1, train_chunk=1)
    torch.testing.assert_close(votes_c, votes)
    # k larger than the bank: all 4 vote; test 0 gets e^1 + e^-1 for class 0
    res = knn_classify(xtr, ytr, xte, yte, k=50, temperature=T)
    assert res["k"] == 4


def test_knn_rejects_unlabelled_and_bad_shapes() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="labelled"):
        knn_classify(x, torch.tensor([0, 1, -1, 0]), x, torch.tensor([0, 1, 1, 0]))
    with pytest.raises(ValueError, match="same D"):
        knn_classify(x, torch.tensor([0, 1, 1, 0]), torch.randn(4, 2), torch.tensor([0, 1, 1, 0]))


class _ThreadAccelerator:
    """A stand-in for ``accelerate.Accelerator`` whose collectives run between threads."""

    def __init__(self, rank: int, world: int, shared: dict) -> None:
        self.process_index, self.num_processes, self.device = rank, world, torch.device("cpu")
        self.shared = shared

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.shared["slots"][self.process_index] = t.clone()
        self.shared["barrier"].wait()
        out = list(self.shared["slots"])
        self.shared["barrier"].wait()
        return out

    def reduce(self, t: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        assert reduction == "sum"
        return torch.stack(self._exchange(t)).sum(0)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange(t))


@pytest.mark.parametrize("world", [2, 3])
def test_knn_distributed_slices_sum_to_single_process(world: int) -> None:
    g = torch.Generator().manual_seed(1)
    xtr, ytr = torch.randn(40, 6, generator=g), torch.randint(0, 6, (40,), generator=g)
    xte, yte = torch.randn(17, 6, generator=g), torch.randint(0, 6, (17,), generator=g)  # 17: uneven slices
    single = knn_classify(xtr, ytr, xte, yte, k=7, temperature=0.1, return_predictions=True)
    shared = {"slots": [None] * world, "barrier": threading.Barrier(world)}
    results: list = [None] * world

    def work(r: int) -> None:
        acc = _ThreadAccelerator(r, world, shared)
        results[r] = knn_classify(xtr, ytr, xte, yte, k=7, temperature=0.1, accelerator=acc, return_predictions=True)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for res in results:
        assert res is not None
        assert res["top1"] == single["top1"] and res["top5"] == single["top5"] and res["n_test"] == 17
        assert torch.equal(res["predictions"], single["predictions"])




def _accelerate_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    xtr, ytr, xte, yte = _clusters(seed=3, n_test=5)  # 15 test rows over 2 ranks
    yte = yte.clone()
    yte[:4] = (yte[:4] + 1) % 3  # 4 deliberately wrong labels → top-1 = 11/15
    res = knn_classify(xtr, ytr, xte, yte, k=5, accelerator=acc, return_predictions=True)
    torch.save({"top1": res["top1"], "n": res["n_test"], "pred": res["predictions"]}, Path(out) / f"r{rank}.pt")
    acc.wait_for_everyone()


def test_knn_two_real_processes(tmp_path: Path) -> None:
    mp.spawn(_accelerate_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    _, _, _, yte = _clusters(seed=3, n_test=5)
    for r in range(2):
        got = torch.load(tmp_path / f"r{r}.pt")
        assert got["n"] == 15 and got["top1"] == pytest.approx(11 / 15)
        assert torch.equal(got["pred"], yte)


# ---------------------------------------------------------------------------------------------
# fidelity metrics


def test_fidelity_unchanged() -> None:
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    v = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    f = fidelity(s, v)
    assert f["cosine"] == pytest.approx(0.5)
    assert f["l2"] == pytest.approx((0 + math.sqrt(8)) / 2)
    assert f["l2_normalized"] == pytest.approx(math.sqrt(2) / 2)


def test_average_ranks_and_spearman_by_hand() -> None:
    assert average_ranks(torch.tensor([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]
    # ranks a = [1, 2.5, 2.5, 4], b = [1, 2, 3, 4]: cov 4.5, var 4.5 and 5 → 4.5 / sqrt(22.5) = sqrt(0.9)
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(math.sqrt(0.9))
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert spearman(x, x.exp() * 3 + 1) == pytest.approx(1.0)  # monotone transform
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, torch.ones(50)))


def test_rank_correlation_invariances() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(30, 6, generator=g, dtype=torch.float64)
    assert rank_correlation(v, v) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    scale = torch.rand(30, 1, generator=g, dtype=torch.float64) + 0.1
    assert rank_correlation(v @ q * scale, v) == pytest.approx(1.0)  # rotation + per-row scale keep every cosine
    wide = torch.cat([v, torch.zeros(30, 4, dtype=torch.float64)], 1)  # output sizes may differ
    assert rank_correlation(wide, v) == pytest.approx(1.0)
    assert abs(rank_correlation(torch.randn(30, 6, generator=g), v)) < 0.3


def test_rank_correlation_hand_computed() -> None:
    # victim at 0°, 30°, 90°: pairs (0,1), (0,2), (1,2) have cos 30°, 90°, 60° → ranks 3, 1, 2
    # stolen at 0°, 20°, -50°: cos 20°, 50°, 70° → ranks 3, 2, 1;  d² = 0 + 1 + 1 → 1 - 6·2/(3·8) = 0.5
    victim = torch.tensor([_unit(0), _unit(30), _unit(90)])
    stolen = torch.tensor([_unit(0), _unit(20), _unit(-50)])
    assert rank_correlation(stolen, victim) == pytest.approx(0.5)


def test_rank_correlation_subsamples_deterministically() -> None:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(80, 5, generator=g)
    s = v + 0.8 * torch.randn(80, 5, generator=g)  # 3,160 pairs
    full = rank_correlation(s, v)
    a = rank_correlation(s, v, max_pairs=1000)
    assert a == rank_correlation(s, v, max_pairs=1000)
    assert a != rank_correlation(s, v, max_pairs=1000, seed=1)
    assert abs(a - full) < 0.1 and 0.2 < full < 0.95
    assert rank_correlation(v, v, max_pairs=500, chunk=64) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        rank_correlation(s[:10], v)


def test_prediction_agreement() -> None:
    victim = torch.tensor([0, 1, 2, 1])
    assert prediction_agreement(victim, victim) == 1.0
    assert prediction_agreement(torch.tensor([0, 2, 2, 1]), victim) == 0.75
    logits = torch.tensor([[5.0, 0, 0], [0, 0, 1], [0, 0, 3], [1, 0, 0]])  # argmax 0, 2, 2, 0
    assert prediction_agreement(logits, victim) == 0.5
    assert prediction_agreement(logits, logits * 2 + 1) == 1.0
    assert math.isnan(prediction_agreement(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="different test sets"):
        prediction_agreement(victim[:3], victim)
    with pytest.raises(ValueError, match="class indices"):
        prediction_agreement(torch.tensor([0.2, 0.7, 0.1, 0.0]), victim)


# ---------------------------------------------------------------------------------------------
# accuracy-vs-queries report


def test_load_records_from_stored_file() -> None:
    skipped: list[str] = []
    recs = load_records(DATA, skipped=skipped)
    assert len(skipped) == 1 and ":19:" in skipped[0]  # the torn last line
    assert not any(r["encoder"] == "control" for r in recs)  # not a curve encoder
    assert {r["attack"] for r in recs if r["encoder"] == "stolen"} == {"infonce", "mse"}  # 'loss' read as attack
    tables = {(t.set, t.probe): t for t in build_tables(recs)}
    assert set(tables) == {("animal_mnist", "linear"), ("animal_mnist", "knn"), ("digits", "linear")}
    t = tables[("animal_mnist", "linear")]
    assert t.queries == [500.0, 1000.0, 3000.0]
    assert list(t.lines) == [("infonce", "none"), ("infonce", "noise"), ("mse", "none")]
    assert t.lines[("infonce", "none")][500.0].values == [0.61]  # the rerun's line replaced the first
    mse = t.lines[("mse", "none")][3000.0]
    assert (mse.n, mse.mean, mse.min, mse.max) == (2, pytest.approx(0.68), 0.66, 0.70)
    assert t.references["victim"].mean == pytest.approx(0.75) and t.references["random"].values == [0.634]


def test_report_cli_on_stored_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.report import main

    res = main([str(DATA), "--out", str(tmp_path / "rep"), "--title", "demo"])
    out = tmp_path / "rep"
    md = (out / "curves.md").read_text()
    assert md == res["markdown"] and md in capsys.readouterr().out
    assert "| attack | defense | 500 | 1,000 | 3,000 |" in md
    assert "| infonce | none | 0.610 | 0.680 | 0.738 |" in md
    assert "| infonce | noise | — | — | 0.640 |" in md
    assert "| mse | none | 0.550 | 0.600 | 0.680 ± 0.028 (2) |" in md  # mean ± sample std (n seeds)
    assert "| victim (reference) | — | 0.750 ± 0.003 (2) | 0.750 ± 0.003 (2) | 0.750 ± 0.003 (2) |" in md
    assert "| random init (reference) | — | 0.634 | 0.634 | 0.634 |" in md
    assert "| attack | 1,000 |" in md and "| victim (reference) | 0.850 |" in md  # digits: no defense column

    with open(out / "curves.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    key = {(r["set"], r["probe"], r["encoder"], r["attack"], r["defense"], r["queries"]): r for r in rows}
    assert len(rows) == 7 + 2 + 2 + 2  # animal linear: 7 points + victim + random; knn 1 + 1; digits 1 + 1
    r = key[("animal_mnist", "linear", "stolen", "mse", "none", "3000")]
    assert (float(r["top1"]), float(r["top1_min"]), float(r["top1_max"]), int(r["n"])) == (pytest.approx(0.68), 0.66, 0.70, 2)
    assert float(key[("animal_mnist", "linear", "victim", "", "", "")]["top1"]) == pytest.approx(0.75)
    assert float(key[("animal_mnist", "knn", "stolen", "infonce", "none", "1000")]["top1"]) == 0.65
    assert float(key[("digits", "linear", "victim", "", "", "")]["top1"]) == 0.85

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["accuracy_vs_queries_animal_mnist_knn.png", "accuracy_vs_queries_animal_mnist_linear.png",
                    "accuracy_vs_queries_digits_linear.png"]
    data = (out / "accuracy_vs_queries_animal_mnist_linear.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "![animal_mnist linear](accuracy_vs_queries_animal_mnist_linear.png)" in md


def test_report_json_and_defaults(tmp_path: Path) -> None:
    rep = {"probe_set": "animal_mnist", "victim_top1": 0.75, "stolen_top1": 0.7, "random_top1": 0.6,
           "queries_spent": 2000, "loss": "infonce",
           "per_set": {"victim": {"animal_mnist": 0.75, "digits": 0.9}, "stolen": {"animal_mnist": 0.7, "digits": 0.8},
                       "random": {"animal_mnist": 0.6}, "control": {"animal_mnist": 0.65}}}
    (tmp_path / "report.json").write_text(json.dumps(rep, indent=1))
    recs = load_records(tmp_path / "report.json")
    t = {(x.set, x.probe): x for x in build_tables(recs)}
    assert t[("digits", "linear")].lines[("infonce", "none")][2000.0].values == [0.8]
    assert t[("animal_mnist", "linear")].references["random"].values == [0.6]
    del rep["loss"]
    (tmp_path / "report.json").write_text(json.dumps(rep))
    with pytest.raises(RecordError, match="'attack' or 'loss'"):
        load_records(tmp_path / "report.json")

    # a plain probe results.jsonl: attack and queries come from the command line
    probe = tmp_path / "run" / "probe" / "results.jsonl"
    probe.parent.mkdir(parents=True)
    probe.write_text("\n".join(json.dumps(r) for r in [
        {"encoder": "victim", "set": "s", "top1": 0.9, "weight_decay": 0.0},
        {"encoder": "stolen", "set": "s", "top1": 0.8, "fidelity": {"cosine": 0.9}}]) + "\n")
    with pytest.raises(RecordError, match="no 'attack'"):
        load_records(probe)
    from launch.report import main

    res = main([str(tmp_path / "run"), "--attack", "mse", "--queries", "100", "--out", str(tmp_path / "o")])
    assert res["tables"][0].lines[("mse", "none")][100.0].values == [0.8]
    assert (tmp_path / "o" / "accuracy_vs_queries_s_linear.png").stat().st_size > 5000
    write_curves([], tmp_path / "empty")  # no records: a table-less report, no crash
    assert "No results." in (tmp_path / "empty" / "curves.md").read_text()


def test_report_cli_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.report import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"encoder": "stolen", "set": "s", "top1": 0.5, "attack": "mse"}\n{"encoder": "victim", "set": "s", "top1": 0.9}\n')
    with pytest.raises(SystemExit) as e:
        main([str(bad), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "queries" in err and "bad.jsonl:1" in err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert "does not exist" in capsys.readouterr().err
