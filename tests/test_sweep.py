"""Sweeps without SLURM: expanding a sweep into rows (stealer/sweep.py), one row for an array task,
errors (launch/sweep.py), and collecting fabricated run directories into a table, a CSV and a PNG
plot (eval/sweep_report.py on eval/curves)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eval.sweep_report import collect  # noqa: E402
from launch import sweep  # noqa: E402
from stealer import sweep as lib  # noqa: E402
from stealer.config import apply_overrides  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def sweep_file(tmp_path: Path) -> Path:
    config = _write(tmp_path / "steal.yaml", {"out_dir": "ignored", "train": {"epochs": 3, "loss": "infonce"}})
    return _write(tmp_path / "s.yaml", {
        "name": "mini",
        "config": str(config),
        "base": {"out_dir": str(tmp_path / "runs"), "cpu": True, "train": {"batch_size": 16}},
        "grid": {
            "train.loss": ["infonce", "mse"],
            "queries": [{"query.num_queries": 100, "victim.budget": 100},
                        {"query.num_queries": 300, "victim.budget": 300}],
            "seed": [0, 1],
        },
        "probe": {"base": {"steps": 20, "sets": ["a:/x/train:/x/test"]}},
    })


def test_expand_names_overrides_and_order(sweep_file, tmp_path):
    rows = sweep.expand(sweep_file)
    assert len(rows) == 8
    assert [r.name for r in rows[:3]] == ["mini_loss-infonce_queries-100_seed-0", "mini_loss-infonce_queries-100_seed-1",
                                          "mini_loss-infonce_queries-300_seed-0"]
    assert rows[-1].name == "mini_loss-mse_queries-300_seed-1"
    assert len({r.name for r in rows}) == 8
    r = rows[2]
    assert r.overrides == [f"out_dir={tmp_path / 'runs'}", "cpu=true", "train.batch_size=16", "train.loss=infonce",
                           "query.num_queries=300", "victim.budget=300", "seed=0", f"name={r.name}"]
    assert r.steal_args[:2] == ["--config", str(tmp_path / "steal.yaml")]
    assert r.run_dir == str(tmp_path / "runs" / r.name)
    assert r.settings == {"train.loss": "infonce", "query.num_queries": 300, "victim.budget": 300, "seed": 0}
    # the probe of a row reads that row's student and writes into its run dir
    assert f"out_dir={r.run_dir}" in r.probe_args and "name=probe" in r.probe_args
    assert any(a.startswith("stolen=") and f"{r.run_dir}/student.pt" in a for a in r.probe_args)
    assert "steps=20" in r.probe_args
    # deterministic: expanding again gives the same rows
    assert [x.to_json() for x in sweep.expand(sweep_file)] == [x.to_json() for x in rows]


def test_rows_file_roundtrip_and_cli(sweep_file, tmp_path, capsys):
    assert sweep.main(["expand", str(sweep_file), "--quiet"]) == 0
    jsonl = Path(capsys.readouterr().out.strip())
    assert jsonl == tmp_path / "runs" / "mini.sweep" / "rows.jsonl"
    tsv = jsonl.with_suffix(".tsv").read_text().splitlines()
    assert tsv[0] == "index\tname\trun_dir\toverrides" and len(tsv) == 9
    assert [r.to_json() for r in sweep.read_rows(jsonl)] == [r.to_json() for r in sweep.expand(sweep_file)]

    assert sweep.main(["count", str(jsonl)]) == 0
    assert capsys.readouterr().out == "8\n"
    assert sweep.main(["row", str(jsonl), "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "name=mini_loss-mse_queries-100_seed-1" and "train.loss=mse" in lines
    assert sweep.main(["row", str(sweep_file), "5", "--name"]) == 0  # the YAML gives the same row
    assert capsys.readouterr().out == "mini_loss-mse_queries-100_seed-1\n"
    assert sweep.main(["row", str(jsonl), "5", "--argv"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["--config", str(tmp_path / "steal.yaml")]


def test_shell_output_survives_bash(sweep_file, tmp_path, capsys):
    assert sweep.main(["row", str(sweep_file), "1", "--shell"]) == 0
    sh = capsys.readouterr().out
    script = sh + 'printf "%s\\n" "$ROW_NAME" "$RUN_DIR" "${#STEAL_ARGS[@]}" "${STEAL_ARGS[-1]}" "${PROBE_ARGS[-1]}"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    row = sweep.expand(sweep_file)[1]
    assert out == [row.name, row.run_dir, str(len(row.steal_args)), row.steal_args[-1], row.probe_args[-1]]


@pytest.mark.parametrize("value", ["infonce", "true", "1e-3", "a b", "", "x: y", "#c", 3, 0.5, 1e-06, 2.5e10,
                                   True, None, [1, 2], ["query", "train"], ["a=b/c.pt"], {"k": 1}])
def test_render_value_roundtrips_through_overrides(value):
    text = lib.render_value(value)
    assert apply_overrides({}, [f"k={text}"])["k"] == value


def test_name_clashes_and_long_names_get_a_digest(tmp_path):
    f = _write(tmp_path / "c.yaml", {"name": "c", "base": {"out_dir": str(tmp_path)},
                                     "grid": {"victim.user": ["a/b", "a b", "ok"]}})
    names = [r.name for r in lib.expand(f)]
    assert names[2] == "c_user-ok"
    assert names[0].startswith("c_user-a-b-") and names[1].startswith("c_user-a-b-") and names[0] != names[1]
    f = _write(tmp_path / "l.yaml", {"name": "l", "base": {"out_dir": str(tmp_path)}, "grid": {"victim.user": ["u" * 300]}})
    (row,) = lib.expand(f)
    assert len(row.name) <= lib.MAX_NAME
    f = _write(tmp_path / "one.yaml", {"name": "solo", "base": {"out_dir": str(tmp_path)}})
    assert [r.name for r in lib.expand(f)] == ["solo"]


@pytest.mark.parametrize("data, message", [
    ({"grid": {"train.lss": ["x"]}}, "row 0 (bad_lss-x): unknown config key 'train.lss'; valid keys under 'train'"),
    ({"grid": {"train.loss": ["infonce", "nope"]}}, "row 1 (bad_loss-nope): train.loss='nope' is not valid; choose one of:"),
    ({"grid": {"seed": ["abc"]}}, "row 0 (bad_seed-abc): seed: expected an integer"),
    ({"grdi": {"seed": [0]}}, "unknown key 'grdi'; valid keys: name, config, base, grid, probe, plot"),
    ({"grid": {"seed": 0}}, "grid 'seed' must be a non-empty list of values, got 0"),
    ({"grid": {"seed": []}}, "grid 'seed' must be a non-empty list"),
    ({"base": {"name": "x"}}, "base sets 'name'"),
    ({"plot": {"y": 1}}, "unknown key 'plot.y'"),
    ({"config": "/nonexistent/steal.yaml"}, "config file /nonexistent/steal.yaml not found"),
    ({"probe": {"base": {"stolen_features": "nope"}}}, "probe: stolen_features='nope' is not valid"),
])
def test_bad_sweeps_fail_in_one_line(tmp_path, capsys, data, message):
    f = _write(tmp_path / "bad.yaml", {"name": "bad", "base": {"out_dir": str(tmp_path)}, **data})
    with pytest.raises(SystemExit) as e:
        sweep.main(["expand", str(f)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_bad_yaml_missing_file_and_row_out_of_range(tmp_path, sweep_file, capsys):
    f = tmp_path / "broken.yaml"
    f.write_text("grid: {seed: [0, 1]\nbase: [")
    for argv, message in [(["expand", str(f)], "is not valid YAML"),
                          (["count", str(tmp_path / "none.yaml")], "not found"),
                          (["row", str(tmp_path / "none.jsonl"), "0"], "rows file"),
                          (["row", str(sweep_file), "8"], "row 8 is out of range: sweep"),
                          (["row", str(sweep_file), "-1"], "has 8 rows (0-7)")]:
        with pytest.raises(SystemExit):
            sweep.main(argv)
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)


def _fake_run(row: lib.Row, *, queries: int, top1: float | None, steps: int = 10, sets=("a", "b")) -> None:
    run = Path(row.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "steal.json").write_text(json.dumps({
        "world_size": 1, "query": {"queries_sent": queries, "cached": queries, "ledger_spent": queries},
        "train": {"steps": steps, "final_loss": 1.5, "seconds": 2.0}}))
    if top1 is None:
        return
    (run / "probe").mkdir(exist_ok=True)
    lines = []
    for i, s in enumerate(sets):
        lines += [{"encoder": "victim", "set": s, "top1": 0.9}, {"encoder": "stolen", "set": s, "top1": 0.0},
                  {"encoder": "random_0", "set": s, "top1": 0.3}, {"encoder": "random", "set": s, "top1": 0.3}]
        lines.append({"encoder": "stolen", "set": s, "top1": top1 - i * 0.1})  # a rerun appended: the last line wins
    (run / "probe" / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"encoder": "torn')


def test_collect_table_csv_png_and_missing_rows(sweep_file, tmp_path, capsys):
    rows = sweep.expand(sweep_file)
    # rows: (loss, queries, seed) in order; make top-1 = f(loss, queries) + seed spread
    expect: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        loss, q, seed = r.settings["train.loss"], r.settings["query.num_queries"], r.settings["seed"]
        if r.index == 7:  # never ran
            continue
        if r.index == 6:  # stole, never probed
            _fake_run(r, queries=q, top1=None)
            continue
        top1 = (0.5 if loss == "infonce" else 0.4) + q / 1000 + 0.02 * seed
        _fake_run(r, queries=q, top1=top1)
        expect.setdefault((loss, q), []).append(top1)

    assert sweep.main(["collect", str(sweep_file)]) == 0
    out = capsys.readouterr()
    assert "6/8 rows complete" in out.out
    assert "missing: row 6 mini_loss-mse_queries-300_seed-0: no probe" in out.err
    assert "missing: row 7 mini_loss-mse_queries-300_seed-1: no " in out.err

    d = tmp_path / "runs" / "mini.sweep"
    table = list(csv.DictReader((d / "summary.csv").open()))
    assert [t["name"] for t in table] == [r.name for r in rows]
    assert [t["status"] for t in table] == ["ok"] * 6 + ["no probe", "missing"]
    t0 = table[0]
    assert t0["train.loss"] == "infonce" and t0["queries"] == "100" and t0["seed"] == "0" and t0["steps"] == "10"
    assert float(t0["stolen_top1:a"]) == pytest.approx(0.6) and float(t0["stolen_top1:b"]) == pytest.approx(0.5)
    assert float(t0["victim_top1:a"]) == 0.9 and float(t0["random_top1:b"]) == 0.3
    assert table[7]["stolen_top1:a"] == "" and table[7]["queries"] == "300"  # x from the grid when no steal.json

    md = (d / "summary.md").read_text()
    assert "8 rows, 6 complete" in md and "## Missing" in md and "![plot](summary.png)" in md
    assert "| loss=infonce | 300 | 0.8100 | 0.8000 | 0.8200 | 2 |" in md  # the mean over seeds
    assert "| loss=mse | 100 | 0.5100 | 0.5000 | 0.5200 | 2 |" in md
    assert "| loss=mse | 300 |" not in md  # neither of its rows has a probe
    png = (d / "summary.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000

    res = collect(rows, tmp_path / "other", probe_set="b", by=["train.loss", "seed"])
    assert res["set"] == "b" and res["by"] == ["train.loss", "seed"]
    pts = {(p["line"], p["x"]): p["mean"] for p in res["points"]}
    assert pts[("loss=infonce, seed=1", 300.0)] == pytest.approx(0.5 + 0.3 + 0.02 - 0.1)
    assert (tmp_path / "other" / "summary.png").read_bytes()[:8] == PNG_MAGIC


def test_collect_with_nothing_run_lists_every_row(sweep_file, tmp_path):
    rows = sweep.expand(sweep_file)
    res = collect(rows)
    assert len(res["missing"]) == 8 and not res["points"] and "png" not in res["paths"]
    assert "No plot" in res["paths"]["md"].read_text()
    assert sweep.main(["collect", str(sweep_file)]) == 0  # incomplete rows are listed, not fatal
    assert sweep.main(["collect", str(sweep_file), "--strict"]) == 1


def test_collect_unknown_probe_set(sweep_file):
    rows = sweep.expand(sweep_file)
    _fake_run(rows[0], queries=100, top1=0.5)
    with pytest.raises(lib.SweepError, match="probe set 'zzz' not in the results; sets found: a, b"):
        collect(rows, probe_set="zzz")


def test_run_dir_command(tmp_path, capsys):
    assert sweep.main(["run-dir", f"out_dir={tmp_path}", "name=x"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "x")
    assert sweep.main(["run-dir", "--config", str(REPO / "launch" / "configs" / "demo.yaml")]) == 0
    assert capsys.readouterr().out.strip() == "runs/demo/steal"


def test_shipped_sweep_config_expands():
    rows = sweep.expand(REPO / "launch" / "configs" / "sweep_demo.yaml")
    assert len(rows) == 12 and rows[0].name == "demo_sweep_loss-infonce_queries-1000_seed-0"
    assert rows[0].run_dir == "runs/sweeps/demo_sweep_loss-infonce_queries-1000_seed-0"


def _probe_like_eval_run(row: lib.Row, linear: dict[str, float], knn: dict[str, float]) -> None:
    """results.jsonl as eval/run.py writes it: per encoder a linear line, then a kNN line; random_<i> seeds, then their mean."""
    run = Path(row.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "steal.json").write_text(json.dumps({"query": {"cached": 100}, "train": {"steps": 5}}))
    (run / "probe").mkdir(exist_ok=True)
    lines = []
    for enc in linear:
        lines += [{"encoder": enc, "set": "a", "probe": "linear", "top1": linear[enc]},
                  {"encoder": enc, "set": "a", "probe": "knn", "top1": knn[enc]}]
    (run / "probe" / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_collect_reads_the_linear_probe_not_the_knn_line_after_it(sweep_file, tmp_path, capsys):
    rows = lib.expand(sweep_file)[:2]
    linear = {"victim": 0.9, "stolen": 0.7, "random_0": 0.2, "random_1": 0.4, "random": 0.3}
    knn = {"victim": 0.8, "stolen": 0.55, "random_0": 0.1, "random_1": 0.3, "random": 0.2}
    _probe_like_eval_run(rows[0], linear, knn)
    _probe_like_eval_run(rows[1], {**linear, "stolen": 0.75}, {**knn, "stolen": 0.6})
    res = collect(rows, tmp_path / "lin")
    rec = res["records"][0]
    assert rec["status"] == "ok" and rec["stolen_top1:a"] == pytest.approx(0.7)  # not the kNN 0.55 written after it
    assert rec["victim_top1:a"] == pytest.approx(0.9) and rec["random_top1:a"] == pytest.approx(0.3)
    (pt,) = res["points"]  # the two seeds of (infonce, 100 queries): mean, spread and sample std over rows
    assert (pt["line"], pt["x"], pt["n"]) == ("loss=infonce", 100.0, 2)
    assert pt["mean"] == pytest.approx(0.725) and pt["std"] == pytest.approx(0.025 * 2 ** 0.5)
    assert res["table"].references["random"].values == pytest.approx([0.2, 0.4, 0.2, 0.4])  # the seeds, not their mean
    md = (tmp_path / "lin" / "summary.md").read_text()
    assert "| loss=infonce | 100 | 0.7250 | 0.7000 | 0.7500 | 2 | 0.0354 |" in md
    assert "Seed noise" in md and "Gain recovered" in md  # eval/curves' lines below the table
    knn_res = collect(rows, tmp_path / "knn", probe="knn")
    assert knn_res["records"][0]["stolen_top1:a"] == pytest.approx(0.55) and knn_res["points"][0]["mean"] == pytest.approx(0.575)
    assert sweep.main(["collect", str(sweep_file), "--probe", "knn", "--out", str(tmp_path / "cli")]) == 0
    assert "2/8 rows complete" in capsys.readouterr().out
    # a results line that is JSON but not a record (no 'set') makes that row "no probe", naming the file
    (Path(rows[1].run_dir) / "probe" / "results.jsonl").write_text('{"encoder": "stolen", "top1": 0.5}\n')
    res = collect(rows, tmp_path / "bad")
    assert res["records"][1]["status"] == "no probe" and "results.jsonl" in res["missing"][0]
    assert "has no 'set'" in res["missing"][0]


def test_collect_over_a_grid_key_draws_a_linear_axis(sweep_file, tmp_path, monkeypatch):
    import eval.report

    rows = lib.expand(sweep_file)
    for r in rows[:4]:  # infonce: queries 100 and 300, seeds 0 and 1
        _fake_run(r, queries=r.settings["query.num_queries"], top1=0.5 + 0.1 * r.settings["seed"])
    figures = []
    save = eval.report.save_figure
    monkeypatch.setattr(eval.report, "save_figure", lambda fig, path, dpi=None: (figures.append(fig.axes[0]), save(fig, path))[1])
    res = collect(rows, tmp_path / "s", x="seed")
    assert res["by"] == ["train.loss", "queries"]
    assert {(p["line"], p["x"]) for p in res["points"]} == {
        (f"loss=infonce, queries={q}", s) for q in (100, 300) for s in (0.0, 1.0)}
    (ax,) = figures
    assert ax.get_xscale() == "linear" and ax.get_xlabel() == "seed"
    xs = sorted({float(x) for line in ax.lines for x in line.get_xdata()})
    assert xs[:2] == [0.0, 1.0]  # the seed-0 points are drawn (a log axis would drop them)
    md = (tmp_path / "s" / "summary.md").read_text()
    assert "| line | seed |" in md and "Seed noise" not in md  # noise lines speak of queries: only for x = queries
    assert (tmp_path / "s" / "summary.png").read_bytes()[:8] == PNG_MAGIC


def test_sweep_library_imports_point_one_way():
    """stealer/sweep.py imports neither eval/ nor launch/ (even while expanding, which loads StealConfig);
    eval/sweep_report.py imports no launch/ module."""
    code = ("import sys; import stealer.sweep as s; s.expand('launch/configs/sweep_demo.yaml');"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('eval', 'launch')]; print(bad);"
            "import eval.sweep_report; bad += [m for m in sys.modules if m.split('.')[0] == 'launch']; sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_help_shows_the_sweep_format(capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "python launch/sweep.py collect SWEEP" in out
    assert "A sweep YAML::" in out and "grid:" in out and "- {query.num_queries: 1000, victim.budget: 1000}" in out
