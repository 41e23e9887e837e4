"""One encoder x one probe set in the streamed modes of eval/run.py (``mode=stream`` / ``mode=lincls``).

``stream``: features of the train and test folders are extracted once, data-parallel, into feature
shards under ``<run>/features/<set>/<encoder>/`` (reused by a rerun); the linear head is trained by
minibatch SGD (or LARS) over the standardised, streamed train features; kNN is streamed against the
train-feature shards. ``lincls``: the SimSiam / MoCo v3 linear evaluation
(:func:`eval.stream_probe.lincls_protocol`): the head is trained on augmented images through the
frozen encoder and scored on centre-cropped test features; kNN uses centre-cropped train features.
Both checkpoint the head under ``<run>/ckpt/<set>/<encoder>/`` and resume from it.
Memory per rank: O(shard_rows x D) for the train side, O(N_test x D) for the test features (kept
for the fidelity metrics), O(D x C) for the head.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from eval.feature_shards import FeatureShards, write_feature_shards
from eval.stream_probe import (StreamSettings, center_crop, evaluate_linear, feature_source, feature_stats, knn_stream,
                               lincls_protocol, resize_size, train_linear)

__all__ = ["settings_of", "probe_streamed"]

MODES = ("full", "stream", "lincls")


def settings_of(cfg: Any) -> StreamSettings:
    """The streamed-head knobs of a ProbeConfig (``optimizer=auto``: lars for lincls, sgd for stream)."""
    opt = cfg.optimizer if cfg.optimizer != "auto" else ("lars" if cfg.mode == "lincls" else "sgd")
    return StreamSettings(epochs=cfg.epochs, batch_size=cfg.probe_batch_size, base_lr=cfg.base_lr, optimizer=opt,
                          momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=cfg.seed,
                          block_rows=cfg.shard_rows, ckpt_every=cfg.ckpt_every)


def _modules(enc: Any) -> list[nn.Module]:
    if isinstance(enc, nn.Module):
        return [enc]
    m = getattr(enc, "module", None)
    return [m] if isinstance(m, nn.Module) else []


def identity(enc_name: str, encode: Any) -> str:
    """What the feature folder is reused for: the name, a SHA-1 of the encoder's weights and buffers, what it
    outputs and how it reads images (a changed checkpoint or preprocessing extracts again)."""
    import hashlib

    h = hashlib.sha1()
    for m in _modules(encode):
        for k, v in m.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(repr((getattr(encode, "which", ""), getattr(encode, "preprocessing", ""))).encode())
    return f"{enc_name}:{h.hexdigest()[:16]}"


def probe_streamed(cfg: Any, set_name: str, enc_name: str, encode: Callable[[torch.Tensor], torch.Tensor],
                   train_dir: str, test_dir: str, acc: Any, decoder: Any = None) -> dict[str, Any]:
    """Linear probe + kNN of one encoder on one set; returns the result row as run_probe keeps it
    (``top1``, ``train_top1``, ``predictions``, ``knn`` with its ``predictions``, ``test_x``, ``test_y``)."""
    rank, world = acc.process_index, acc.num_processes
    dev = acc.device
    feat_dir = Path(cfg.run_dir) / "features" / set_name / enc_name
    ckpt_dir = Path(cfg.run_dir) / "ckpt" / set_name / enc_name
    s = settings_of(cfg)
    kw: dict[str, Any] = dict(encoder=identity(enc_name, encode), channels=cfg.channels, image_size=cfg.image_size,
                              batch_size=cfg.batch_size, rank=rank, world=world, device=dev,
                              shard_rows=cfg.shard_rows, dtype=cfg.feature_dtype)
    if cfg.mode == "lincls":  # eval transform of main_lincls: Resize(S*256/224) + CenterCrop(S)
        kw.update(transform=center_crop(cfg.image_size), decode_size=resize_size(cfg.image_size))
    elif decoder is not None:
        kw["decoder"] = decoder
    train = write_feature_shards(encode, train_dir, feat_dir / "train", limit=cfg.train_limit, **kw)
    test = write_feature_shards(encode, test_dir, feat_dir / "test", **kw)
    if train.num_samples == 0 or test.num_samples == 0:
        raise ValueError(f"probe set {set_name}: {train_dir if train.num_samples == 0 else test_dir} holds no readable samples")
    num_classes = max(train.num_classes, test.num_classes)
    conf = {"set": set_name, "encoder": enc_name, "mode": cfg.mode, "train": train.manifest["source"],
            "train_limit": cfg.train_limit, "image_size": cfg.image_size}
    if cfg.mode == "lincls":
        head, log = lincls_protocol(encode, _modules(encode), train_dir, dim=train.dim, num_classes=num_classes,
                                    channels=cfg.channels, image_size=cfg.image_size, settings=s, acc=acc,
                                    ckpt_dir=str(ckpt_dir), resume=cfg.resume, config=conf, limit=cfg.train_limit,
                                    run_dir=str(cfg.run_dir))
        mean = std = None
    else:
        mean, std = feature_stats(train, acc)
        head, log = train_linear(feature_source(train, s, acc, mean, std), dim=train.dim, num_classes=num_classes,
                                 num_samples=train.num_samples, settings=s, acc=acc, ckpt_dir=str(ckpt_dir),
                                 resume=cfg.resume, config=conf, run_dir=str(cfg.run_dir))
    top1, pred = evaluate_linear(head, test, mean=mean, std=std)
    train_top1, _ = evaluate_linear(head, train, mean=mean, std=std)
    knn = knn_stream(train, test, k=cfg.knn_k, acc=acc, return_predictions=True)
    test_x, test_y = test.load_all()
    return {"top1": top1, "train_top1": train_top1, "predictions": pred, "weight_decay": s.weight_decay,
            "mode": cfg.mode, "optimizer": s.optimizer, "epochs": s.epochs, "batch_size": s.batch_size,
            "lr": s.lr, "steps": log["steps"], "n_train": train.num_samples, "knn": knn,
            "test_x": test_x, "test_y": test_y}


def feature_folder(run_dir: str | Path, set_name: str, enc_name: str, split: str) -> FeatureShards:
    """The feature folder a streamed probe wrote (for reports and tests)."""
    return FeatureShards(Path(run_dir) / "features" / set_name / enc_name / split)
