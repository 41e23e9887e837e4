"""The ImageNet path rehearsed at tiny size: a fake ImageNet tree (real layouts, sizes and quirks) ->
make_shards --workers -> the icml22_imagenet configs (ResNet-50 victim in the official SimSiam layout,
224 px, ResNet-50 student) -> probe."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launch.make_shards import main as make_shards_main
from stealer.fake_imagenet import VAL_LAYOUTS, class_colour, make_fake_imagenet
from stealer.shards import read_manifest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "launch" / "configs"


def _samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of every sample in a shard folder."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in read_manifest(folder)["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            for m in tar.getmembers():
                key, ext = m.name.rsplit(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _rel(paths: list[str]) -> list[str]:
    """Generator paths (``train/<wnid>/x.JPEG``) relative to the converted folder (``<wnid>/x.JPEG``)."""
    return sorted(p.split("/", 1)[1] for p in paths)


def _nearest_class(rgb: np.ndarray, k: int) -> int:
    colours = np.array([class_colour(i, k) for i in range(k)], dtype=float)
    return int(np.argmin(((colours - rgb.reshape(-1, 3).mean(0)) ** 2).sum(1)))


@pytest.mark.parametrize("layout", VAL_LAYOUTS)
def test_every_val_layout_gets_train_indices_and_quirks_are_handled(tmp_path, layout, capsys):
    root = tmp_path / "imagenet"
    truth = make_fake_imagenet(root, classes=3, train_per_class=4, val_images=6, val_layout=layout, longer_side=80, seed=1)
    out = tmp_path / "shards"
    assert make_shards_main([str(root), str(out), "--workers", "2", "--keep-order"]) == 0
    cap = capsys.readouterr()
    train, val = read_manifest(out / "train"), read_manifest(out / "val")
    assert train["classes"] == val["classes"] == truth["wnids"]
    assert train["image_ext"] == val["image_ext"] == "jpg"  # one PNG among 12 does not turn the set into PNGs

    # train: the truncated and the 0-byte file skipped by name, the others converted by name
    q = truth["quirks"]["train"]
    assert (train["num_samples"], train["skipped"]) == (10, 2)
    assert sorted(train["quirks"]["unreadable"]["files"]) == _rel(q["truncated"] + q["empty"])
    assert train["quirks"]["cmyk_to_rgb"]["files"] == _rel(q["cmyk"])
    assert train["quirks"]["grey_to_rgb"]["files"] == _rel(q["grey"])
    assert train["quirks"]["png_to_jpg"]["files"] == _rel(q["png_named_jpeg"])
    assert {k: v["count"] for k, v in train["quirks"].items()} == {
        "unreadable": 2, "cmyk_to_rgb": 1, "grey_to_rgb": 1, "png_to_jpg": 1}
    warned = [line for line in cap.err.splitlines() if "skipping unreadable image" in line]
    assert len(warned) == 2 and any("empty file, 0 bytes" in w for w in warned) and any("truncated" in w for w in warned)
    assert "unreadable: 2 (" in cap.out and "cmyk_to_rgb: 1 (" in cap.out and "png_to_jpg: 1 (" in cap.out
    for sample in _samples(out / "train").values():  # every stored image is an RGB JPEG now
        with Image.open(io.BytesIO(sample["jpg"])) as im:
            assert (im.format, im.mode) == ("JPEG", "RGB")

    # val: every image carries the class the generator gave it, matched by wnid, whatever the layout
    assert (val["num_samples"], val["skipped"]) == (6, 0)
    assert {k: v["files"] for k, v in val["quirks"].items()} == {
        "cmyk_to_rgb": _rel(truth["quirks"]["val"]["cmyk"]), "grey_to_rgb": _rel(truth["quirks"]["val"]["grey"])}
    order = sorted(str(p.relative_to(root / "val")) for p in (root / "val").rglob("*.JPEG"))  # key index -> file
    grey = {Path(p).stem for p in truth["quirks"]["val"]["grey"]}
    got = {}
    for key, sample in _samples(out / "val").items():
        stem = Path(order[int(key.rsplit("-", 1)[1])]).stem
        got[stem] = val["classes"][int(sample["cls"])]
        if stem not in grey:  # and the pixels agree: the class colour is the nearest one
            rgb = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=float)
            assert _nearest_class(rgb, 3) == int(sample["cls"]), stem
    assert got == truth["val_labels"]


def test_flat_val_alone_and_bad_label_files_fail_in_one_line(tmp_path, capsys):
    root = tmp_path / "imagenet"
    truth = make_fake_imagenet(root, classes=3, train_per_class=4, val_images=6, val_layout="devkit", longer_side=48)
    # the val folder alone: the devkit's ground truth is found two folders up, its classes come from meta.mat
    assert make_shards_main([str(root / "val"), str(tmp_path / "v1"), "--keep-order"]) == 0
    m = read_manifest(tmp_path / "v1")
    assert m["classes"] == truth["wnids"] and m["num_samples"] == 6
    assert "ILSVRC2012_validation_ground_truth.txt" in m["source"]
    labels = [m["classes"][int(s["cls"])] for _, s in sorted(_samples(tmp_path / "v1").items())]
    assert labels == [truth["val_labels"][n] for n in sorted(truth["val_labels"])]
    capsys.readouterr()

    def fails(argv: list[str], *needles: str) -> None:
        assert make_shards_main(argv) == 2
        err = capsys.readouterr().err.splitlines()[-1]  # warnings about the train part may come first
        assert err.startswith("make_shards: error: ") and "Traceback" not in err, err
        for needle in needles:
            assert needle in err, err

    meta = root / "ILSVRC2012_devkit_t12" / "data" / "meta.mat"
    meta.rename(tmp_path / "meta.mat")
    fails([str(root), str(tmp_path / "v2")], "meta.mat", "ILSVRC2012_devkit_t12", "LOC_val_solution.csv")
    assert not list(tmp_path.glob("v2/**/*.tar"))  # val's labels are read before train is converted
    shutil.rmtree(root / "ILSVRC2012_devkit_t12")
    fails([str(root / "val"), str(tmp_path / "v3")], "no label file was found", "--val-labels FILE")
    bad = tmp_path / "imagenet_2012_validation_synset_labels.txt"
    bad.write_text("n00000001\ncat\n")
    fails([str(root / "val"), str(tmp_path / "v4"), "--val-labels", str(bad)], "line 2", "'cat'")
    # given explicitly, a label file naming 5 of the 6 images: the sixth is left out, named, not a crash
    good = tmp_path / "labels" / "imagenet_2012_validation_synset_labels.txt"
    good.parent.mkdir()
    good.write_text("".join(truth["val_labels"][n] + "\n" for n in sorted(truth["val_labels"])[:5]))
    assert make_shards_main([str(root), str(tmp_path / "v5"), "--val-labels", str(good)]) == 0
    m5 = read_manifest(tmp_path / "v5" / "val")
    assert m5["num_samples"] == 5 and m5["quirks"]["unlabelled"]["files"] == ["ILSVRC2012_val_00000006.JPEG"]
    assert "1 images in" in capsys.readouterr().err
    fails([str(root / "train"), str(tmp_path / "v6"), "--val-labels", str(good)], "class folders")


def test_fake_imagenet_is_deterministic_and_shaped_like_imagenet(tmp_path):
    kw = dict(classes=3, train_per_class=5, val_images=4)
    a, b = make_fake_imagenet(tmp_path / "a", seed=3, **kw), make_fake_imagenet(tmp_path / "b", seed=3, **kw)
    make_fake_imagenet(tmp_path / "c", seed=4, **kw)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert a == b and len(files) == 15 + 4 + 3  # images + the csv, the synset mapping, fake_imagenet.json
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()
               for f in files if (tmp_path / "c" / f).is_file())
    sizes, kinds = [], {}
    for f in files:
        if f.suffix != ".JPEG" or (tmp_path / "a" / f).stat().st_size == 0:
            continue
        try:
            with Image.open(tmp_path / "a" / f) as im:
                im.load()
                sizes.append(im.size)
                kinds[str(f)] = (im.format, im.mode)
        except OSError:
            kinds[str(f)] = "truncated"
    q = a["quirks"]["train"]
    assert kinds[q["cmyk"][0]] == ("JPEG", "CMYK") and kinds[q["grey"][0]] == ("JPEG", "L")
    assert kinds[q["png_named_jpeg"][0]] == ("PNG", "RGB") and kinds[q["truncated"][0]] == "truncated"
    assert (tmp_path / "a" / q["empty"][0]).stat().st_size == 0
    w, h = np.array(sizes, dtype=float).T
    assert np.all(np.maximum(w, h) <= 500) and np.all(np.maximum(w, h) >= 200)
    assert np.all((w / h >= 0.74) & (w / h <= 1.81)) and np.mean(np.maximum(w, h) == 500) > 0.5


@pytest.mark.slow
def test_imagenet_rehearsal_runs_the_paper_configs_end_to_end(tmp_path):
    """benchmarks/imagenet_rehearsal.py at tiny size: every phase a user command, the paper configs
    changed only in counts and paths; then what each phase left behind is checked."""
    import torch

    from stealer.config import load_config, to_dict
    from stealer.steal import StealConfig
    from stealer.student import StolenEncoder, load_student

    argv = ["--classes", "4", "--train-per-class", "6", "--val-images", "8", "--query", "16", "--probe-train", "8",
            "--epochs", "1", "--batch-size", "4", "--probe-steps", "50", "--knn-k", "3", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "imagenet_rehearsal.py"), *argv], env=env,
                       capture_output=True, text=True, timeout=900)  # its own small parent: clean RSS figures
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    print(p.stdout)
    phases = json.loads((tmp_path / "report.json").read_text())["phases"]
    assert list(phases) == ["generate", "victim", "make_shards", "query", "train", "probe"]
    assert all(p["seconds"] > 0 and p["cpu_seconds"] > 0 and p["peak_rss_mib"] > 10 for p in phases.values())
    assert phases["generate"]["peak_rss_mib"] < phases["train"]["peak_rss_mib"]  # numpy + PIL vs a ResNet-50 step
    assert phases["train"]["peak_rss_mib"] > 300  # the student's weights, gradients and LARS state at 224 px

    # make_shards: the quirky train files skipped or converted, each by name
    truth = json.loads((tmp_path / "imagenet" / "fake_imagenet.json").read_text())
    data = tmp_path / "data"
    query, probe_train, val = (read_manifest(data / s) for s in ("query", "probe_train", "val"))
    assert query["num_samples"] + query["skipped"] == 16 and probe_train["num_samples"] + probe_train["skipped"] == 8
    assert query["skipped"] + probe_train["skipped"] == 2 and (val["num_samples"], val["skipped"]) == (8, 0)
    logged = {kind: sorted(f for m in (query, probe_train) for f in m.get("quirks", {}).get(kind, {}).get("files", []))
              for kind in ("unreadable", "cmyk_to_rgb", "grey_to_rgb", "png_to_jpg")}
    q = truth["quirks"]["train"]
    assert logged == {"unreadable": _rel(q["truncated"] + q["empty"]), "cmyk_to_rgb": _rel(q["cmyk"]),
                      "grey_to_rgb": _rel(q["grey"]), "png_to_jpg": _rel(q["png_named_jpeg"])}
    assert val["classes"] == query["classes"] == truth["wnids"]
    shards_log = (tmp_path / "logs" / "make_shards.log").read_text()
    assert sum("skipping unreadable image" in line for line in shards_log.splitlines()) == 2

    # query and train: the paper's config at 224 px, ResNet-50 victim and student; the ledger paid once per image
    n = query["num_samples"]
    steal_cfg = CONFIGS / "icml22_imagenet_infonce_t0.1.yaml"
    cfg = load_config(StealConfig, tmp_path / "runs" / steal_cfg.stem / "config.yaml")
    assert (cfg.data.image_size, cfg.victim.arch, cfg.student.arch) == (224, "resnet50", "resnet50")
    assert (cfg.query.num_queries, cfg.victim.budget) == (n, n)

    def flat(d: dict, pre: str = "") -> dict:
        return {k2: v2 for k, v in d.items() for k2, v2 in (flat(v, f"{pre}{k}.").items() if isinstance(v, dict)
                                                             else [(f"{pre}{k}", v)])}

    paper, ran = flat(to_dict(load_config(StealConfig, steal_cfg))), flat(to_dict(cfg))
    resolved = {f"victim.{k}" for k in ("preprocess", "mean", "std", "resize", "crop", "interpolation")}  # by the run
    changed = {k for k in paper if paper[k] != ran[k]} - resolved  # the paper's settings but for counts and paths
    assert changed == {"out_dir", "cpu", "phases", "data.query", "data.workers", "victim.checkpoint", "victim.budget",
                       "query.num_queries", "query.batch_size", "train.epochs", "train.batch_size"}, changed
    assert phases["query"]["images"] == n
    qp = json.loads((cfg.run_dir / "query_phase.json").read_text())
    assert qp["queries_sent"] == n  # each query image paid once, as the ledger below says
    pre = qp["victim_preprocess"]  # a file in the released layout is fed as its own repository feeds it
    assert (pre["preset"], pre["resize"], pre["crop"]) == ("imagenet", 256, 224)
    from victims.ledger import QueryLedger

    ledger = QueryLedger(cfg.run_dir / "victim_state" / "ledger.sqlite")
    assert ledger.spent(cfg.victim.user) == n
    assert read_manifest(cfg.run_dir / "cache")["num_samples"] == n
    metrics = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    student = load_student(cfg.run_dir / "student.pt")
    torch.manual_seed(cfg.seed)  # the init the train phase started from
    init = StolenEncoder("resnet50", 2048, in_chans=3, width=64, stem="imagenet", image_size=224)
    trained, start = student.state_dict(), init.state_dict()
    assert set(trained) == set(start)
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], trained[k])]
    assert "backbone.conv1.weight" in moved and "head.weight" in moved

    # probe: victim, stolen and random-init rows with numbers, on the probe-train split and val
    rows = [json.loads(line) for line in (tmp_path / "runs" / "icml22_imagenet_probe" / "results.jsonl").read_text().splitlines()]
    linear = {r["encoder"]: r for r in rows if r["probe"] == "linear"}
    for name in ("victim", "stolen", "random_0"):
        r = linear[name]
        assert r["n_train"] == probe_train["num_samples"] and r["n_test"] == 8 and 0.0 <= r["top1"] <= 1.0
    fid = linear["stolen"]["fidelity"]
    assert -1.0 <= fid["cosine"] <= 1.0 and 0.0 <= fid["agreement_linear"] <= 1.0


def test_jpeg_share_decides_the_set_and_foreign_val_classes_are_left_out(tmp_path, capsys):
    rng = np.random.default_rng(0)
    mixed = tmp_path / "mixed"
    for i in range(6):  # half PNG: too many to re-encode lossily, the set is stored as PNG
        d = mixed / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8))
        img.save(d / f"{i}.jpg", format="PNG" if i % 2 else "JPEG")  # every name says .jpg
    assert make_shards_main([str(mixed), str(tmp_path / "m")]) == 0
    m = read_manifest(tmp_path / "m")
    assert m["image_ext"] == "png" and m["num_samples"] == 6 and "png_to_jpg" not in m.get("quirks", {})

    root = tmp_path / "imagenet"
    truth = make_fake_imagenet(root, classes=2, train_per_class=5, val_images=4, val_layout="folders", longer_side=40)
    stray = root / "val" / "n99999999"
    stray.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(stray / "ILSVRC2012_val_00000099.JPEG")
    capsys.readouterr()
    assert make_shards_main([str(root), str(tmp_path / "s")]) == 0
    assert "n99999999 is not among the 2 classes; its 1 images are left out" in capsys.readouterr().err
    val = read_manifest(tmp_path / "s" / "val")
    assert val["classes"] == truth["wnids"] and val["num_samples"] == 4
    assert val["quirks"]["other_class"]["files"] == ["n99999999/ILSVRC2012_val_00000099.JPEG"]
    assert sorted(p.name for p in (tmp_path / "s" / "val").glob("*.tar")) == ["val-000000.tar"]
