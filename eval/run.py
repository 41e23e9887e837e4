"""Compare encoders on downstream sets: linear-probe top-1 per (encoder, set) and fidelity to the victim."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable

import torch

from eval.features import extract_features
from eval.knn import knn_classify
from eval.metrics import fidelity, prediction_agreement, rank_correlation
from eval.probe import linear_probe
from eval.stream_run import MODES, probe_streamed
from stealer.config import (Channels, ConfigError, JobHeader, Momentum, NonNegFloat, NonNegInt, OneOf, PositiveFloat,
                            PositiveInt, check_victim_preprocess, choice, own_default)
from stealer.jsonsafe import dumps as json_dumps
from stealer.student import StolenEncoder, load_student

__all__ = ["ProbeConfig", "run_probe", "parse_set", "student_encoder"]


@dataclass
class ProbeConfig(JobHeader):
    """The probe job: the shared header (``name``, ``out_dir``, ``seed``, ``cpu``: :class:`stealer.config.JobHeader`),
    the encoders, the sets and the probe's settings."""

    name: str = own_default("name", "probe")
    victim: str = "runs/demo/victim/checkpoint.pth.tar"  # '' = no victim row
    victim_representation: Annotated[str, OneOf("backbone", "projector")] = "backbone"
    # how the victim reads images (as victim.preprocess of the steal config): auto (the checkpoint's own record, else
    # ImageNet's Resize 256 + CenterCrop 224 + ImageNet mean/std) | imagenet | simsiam | mocov3 | simclr | project | none
    # (victims/preprocess.py);
    # the victim_mean/std/resize/crop/interpolation keys override the preset. The victim's probe images are decoded
    # with its geometry (exactly torchvision's); stolen encoders read them at image_size as before.
    victim_preprocess: str = "auto"
    victim_mean: list[float] | float | None = None
    victim_std: list[float] | float | None = None
    victim_resize: NonNegInt | None = None  # 0 = no resize
    victim_crop: NonNegInt | None = None  # 0 = no crop
    victim_interpolation: str = ""  # '' = the preset's
    stolen: list[str] = field(default_factory=list)  # NAME=path/to/student.pt ...
    random: bool = True  # add random-init encoders of the first stolen encoder's architecture
    random_seeds: PositiveInt = 5  # how many random inits; 'random' reports their mean (min/max kept)
    control_teacher: bool = False  # also probe the random-init victim a control steal queried (seed 0)
    stolen_features: Annotated[str, OneOf("output", "backbone")] = "output"  # what imitates the victim | pooled features
    sets: list[str] = field(default_factory=lambda: [
        "animal_mnist:runs/demo/data/animal_mnist/probe_train:runs/demo/data/animal_mnist/probe_test"])
    image_size: PositiveInt = 32
    channels: Channels = 1
    train_limit: PositiveInt | None = None  # use only the first N probe-train images (a few-label probe); None = all
    batch_size: PositiveInt = 500
    steps: PositiveInt = 300  # optimizer steps of each linear probe
    knn_k: PositiveInt = 20
    lr: PositiveFloat = 0.01
    # full: features in memory, full-batch logistic regression (the README figures) | stream: features extracted once
    # into feature shards (<run>/features), minibatch SGD/LARS over them and streamed kNN, memory flat in N, resumable |
    # lincls: the SimSiam/MoCo v3 linear evaluation (augmented images through the frozen encoder, LARS, 90 epochs,
    # batch 4096, lr = base_lr x batch / 256, cosine) for comparison with published numbers
    mode: str = "full"
    epochs: PositiveInt = 90  # stream / lincls: epochs of the linear head
    probe_batch_size: PositiveInt = 4096  # stream / lincls: global batch of the head (batch_size is the extraction's)
    base_lr: PositiveFloat = 0.1  # stream / lincls: lr = base_lr x probe_batch_size / 256
    optimizer: str = "auto"  # stream / lincls: lars | sgd | auto (lars for lincls, sgd for stream)
    momentum: Momentum = 0.9
    weight_decay: NonNegFloat = 0.0
    feature_dtype: Annotated[str, OneOf("float32", "float16")] = "float32"  # feature shards (float16: half the disk)
    shard_rows: PositiveInt = 8192  # rows per feature shard and per shuffle block (the memory bound)
    ckpt_every: PositiveInt = 100  # stream / lincls: head checkpoint every N steps (and on preemption)
    resume: str = "auto"  # stream / lincls: auto (continue a stopped head) | none

    def validate(self) -> None:
        choice("stolen_features", self.stolen_features, ["output", "backbone"])
        choice("victim_representation", self.victim_representation, ["backbone", "projector"])
        choice("mode", self.mode, list(MODES))
        choice("optimizer", self.optimizer, ["auto", "lars", "sgd"])
        choice("feature_dtype", self.feature_dtype, ["float32", "float16"])
        if not self.sets:
            raise ConfigError("sets=[] probes nothing; give at least one NAME:TRAIN_SHARDS:TEST_SHARDS")
        if not self.victim and not self.stolen:
            raise ConfigError("victim='' and stolen=[] leave nothing to probe; set victim=CHECKPOINT or stolen=[NAME=student.pt]")
        check_victim_preprocess("victim_", self.victim_preprocess, self.victim_interpolation, self.victim_mean, self.victim_std)
        for s in self.stolen:
            if "=" not in s:
                raise ConfigError(f"stolen entry '{s}' is not NAME=path/to/student.pt")
        for s in self.sets:
            parse_set(s)


def parse_set(spec: str) -> tuple[str, str, str]:
    """``name:train_dir:test_dir`` → (name, train_dir, test_dir); a trailing ``?`` on the name
    (``fashion_mnist?:...``) marks an optional set, probed only when its shards exist."""
    parts = spec.split(":")
    if len(parts) != 3 or not all(parts) or parts[0] == "?":
        raise ConfigError(f"probe set '{spec}' is not NAME:TRAIN_SHARDS:TEST_SHARDS (NAME? for an optional set)")
    return parts[0].rstrip("?"), parts[1], parts[2]


def present_sets(specs: list[str]) -> list[str]:
    """The probe sets to run: every required one, and the optional ones (``NAME?``) whose train
    and test shard folders both exist (the others are named on stderr and skipped)."""
    out = []
    for spec in specs:
        name, train, test = parse_set(spec)
        if spec.split(":")[0].endswith("?") and not all((Path(d) / "manifest.json").is_file() for d in (train, test)):
            print(f"note: optional probe set {name} skipped: {train} or {test} does not exist", file=sys.stderr)
            continue
        out.append(spec)
    return out


def student_encoder(model: StolenEncoder, which: str, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    model = model.to(device).eval()

    @torch.no_grad()
    def enc(x: torch.Tensor) -> torch.Tensor:
        h = model.preprocess(x)
        return model(h) if which == "output" else model.features(h)

    enc.module, enc.which = model, which  # type: ignore[attr-defined]  # lincls: sanity check; stream: identity
    return enc


def build_probe_victim(cfg: ProbeConfig, device: Any = "cpu") -> Any:
    """The probe's victim encoder (a ``VictimEncoder``, preprocessing resolved from the victim_* keys), or None.

    Its probe images are to be decoded with ``victim.decoder()`` (its exact resize/crop; None = the stream's).
    """
    from victims.preprocess import preprocess_kwargs
    from victims.simsiam import load_victim_encoder

    if not cfg.victim:
        return None
    return load_victim_encoder(cfg.victim, representation=cfg.victim_representation,
                               **preprocess_kwargs(cfg, "victim_", "victim_")).to(device)


def _save_resolved(cfg: ProbeConfig, victim: Any) -> None:
    """Rewrite the run's config.yaml with the victim preprocessing the probe resolved (auto → what it used)."""
    import dataclasses

    from stealer.config import save_config

    pre = victim.preprocessing
    if (cfg.run_dir / "config.yaml").is_file():
        save_config(dataclasses.replace(cfg, victim_preprocess=pre.preset, victim_mean=list(pre.mean),
                                        victim_std=list(pre.std), victim_resize=pre.resize or 0, victim_crop=pre.crop or 0,
                                        victim_interpolation=pre.interpolation), cfg.run_dir / "config.yaml")


def run_probe(cfg: ProbeConfig, accelerator: Any) -> dict[str, dict[str, Any]]:
    """Probe every encoder on every set; write ``results.jsonl``; return ``{encoder: {set: metrics}}``."""
    from victims.simsiam import random_victim

    acc = accelerator
    dev = acc.device
    encoders: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    decoders: dict[str, Any] = {}  # encoder name → its per-image decoder (victims: their exact geometry)
    victim = build_probe_victim(cfg, dev)
    if victim is not None:
        encoders["victim"] = victim
        decoders["victim"] = victim.decoder()
        if acc.is_main_process:
            _save_resolved(cfg, victim)
        if cfg.control_teacher:
            encoders["control_teacher"] = random_victim(victim).to(dev)  # what build_victim_api serves
            decoders["control_teacher"] = decoders["victim"]
    first_meta = None
    for item in cfg.stolen:
        name, path = item.split("=", 1)
        model = load_student(path)
        first_meta = first_meta or model.meta
        encoders[name] = student_encoder(model, cfg.stolen_features, dev)
    random_names = []
    if cfg.random and first_meta is not None:
        m = first_meta
        for i in range(max(1, cfg.random_seeds)):
            torch.manual_seed(cfg.seed + 12345 + i)
            rnd = StolenEncoder(m["arch"], m["out_dim"], in_chans=m["in_chans"], width=m["width"], stem=m["stem"],
                                mean=m["mean"], std=m["std"])
            random_names.append(f"random_{i}")
            encoders[random_names[-1]] = student_encoder(rnd, cfg.stolen_features, dev)

    results: dict[str, dict[str, Any]] = {n: {} for n in encoders}
    run = cfg.run_dir
    if acc.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
    for spec in present_sets(cfg.sets):
        set_name, train_dir, test_dir = parse_set(spec)
        test_feats: dict[str, torch.Tensor] = {}
        preds: dict[str, torch.Tensor] = {}
        knn_preds: dict[str, torch.Tensor] = {}
        for enc_name, enc in encoders.items():
            t0 = time.time()
            if cfg.mode != "full":  # features on disk, streamed head and kNN (eval/stream_run.py)
                res = probe_streamed(cfg, set_name, enc_name, enc, train_dir, test_dir, acc, decoders.get(enc_name))
                test_feats[enc_name] = res.pop("test_x")
                preds[enc_name] = res.pop("predictions")
                knn_preds[enc_name] = res["knn"].pop("predictions")
                res["seconds"], res["n_test"] = time.time() - t0, len(res.pop("test_y"))
                results[enc_name][set_name] = res
                continue
            kw = dict(channels=cfg.channels, image_size=cfg.image_size, batch_size=cfg.batch_size,
                      rank=acc.process_index, world=acc.num_processes, device=dev, decoder=decoders.get(enc_name))
            xtr, ytr = extract_features(enc, train_dir, limit=cfg.train_limit, **kw)
            xte, yte = extract_features(enc, test_dir, **kw)
            test_feats[enc_name] = xte
            res = linear_probe(xtr, ytr, xte, yte, accelerator=acc, steps=cfg.steps, lr=cfg.lr, seed=cfg.seed)
            preds[enc_name] = res.pop("predictions")
            knn = knn_classify(xtr, ytr, xte, yte, k=cfg.knn_k, accelerator=acc, return_predictions=True)
            knn_preds[enc_name] = knn.pop("predictions")
            res["knn"] = knn
            res["seconds"] = time.time() - t0
            res["n_train"], res["n_test"] = len(ytr), len(yte)
            results[enc_name][set_name] = res
        if "victim" in test_feats:
            for enc_name, f in test_feats.items():
                if enc_name == "victim":
                    continue
                fid: dict[str, float] = {}
                if f.shape == test_feats["victim"].shape:
                    fid.update(fidelity(f, test_feats["victim"]))
                fid["rank_correlation"] = rank_correlation(f, test_feats["victim"])
                fid["agreement_linear"] = prediction_agreement(preds[enc_name], preds["victim"])
                fid["agreement_knn"] = prediction_agreement(knn_preds[enc_name], knn_preds["victim"])
                results[enc_name][set_name]["fidelity"] = fid
        if random_names:  # random init varies a lot between seeds: report the mean and the spread
            tops = [results[n][set_name]["top1"] for n in random_names]
            results.setdefault("random", {})[set_name] = {
                "top1": sum(tops) / len(tops), "top1_min": min(tops), "top1_max": max(tops), "seeds": len(tops)}
        if acc.is_main_process:
            with open(run / "results.jsonl", "a") as fh:
                for enc_name in results:
                    r = dict(results[enc_name][set_name])
                    knn = r.pop("knn", None)
                    # strict JSON: a kNN top5 with < 5 classes (or any other undefined metric) is null, not NaN
                    fh.write(json_dumps({"encoder": enc_name, "set": set_name, "probe": "linear", **r}) + "\n")
                    if knn is not None:
                        fh.write(json_dumps({"encoder": enc_name, "set": set_name, "probe": "knn", **knn}) + "\n")
    return results
