"""What the defense x attack table measures: linear probes of stolen encoders and the victim, the honest
user's utility on defended answers, and the watermark verdicts (``launch/defense_table.py``).

Built on :func:`eval.features.extract_features` and :func:`eval.probe.linear_probe` (a stolen encoder's
output is read as ``launch/probe.py`` reads it, :func:`eval.run.student_encoder`) and on
:mod:`eval.watermark`. Images meant for the victim are decoded with the ``decoder`` the steal's query
phase uses for it (``stealer.defense_table.query_decoder``: the victim's recorded resize/crop, or None
for the stream's own decode at ``image_size``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from eval.features import extract_features
from eval.probe import linear_probe

__all__ = ["encoder_fn", "out_dim", "probe_encoder", "probe_student", "load_images", "encode", "honest_utility",
           "watermark_verdicts"]


def encoder_fn(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 images → a stolen encoder's output (its head), as ``launch/probe.py`` reads it."""
    from eval.run import student_encoder

    return student_encoder(model, "output", torch.device("cpu"))


def out_dim(model: Any) -> int | None:
    """The output dimension of a stolen encoder (its head) or a victim (``out_dim``)."""
    head = getattr(model, "head", None)
    return getattr(head, "out_features", None) if head is not None else getattr(model, "out_dim", None)


def probe_encoder(encode: Callable[[torch.Tensor], torch.Tensor], probe: Any, *, channels: int, image_size: int,
                  seed: int, decoder: Any = None) -> float:
    """Linear-probe top-1 of ``encode`` on ``probe`` (``train``/``test`` shard folders, ``n_train``/``n_test``
    limits, ``steps``); ``decoder``: the victim's per-image decode (None: the stream's at ``image_size``)."""
    kw = dict(channels=channels, image_size=image_size, decoder=decoder)
    xtr, ytr = extract_features(encode, probe.train, limit=probe.n_train, **kw)
    xte, yte = extract_features(encode, probe.test, limit=probe.n_test, **kw)
    return float(linear_probe(xtr, ytr, xte, yte, steps=probe.steps, seed=seed)["top1"])


def probe_student(path: str | Path | Any, probe: Any, *, channels: int, image_size: int, seed: int) -> float:
    """:func:`probe_encoder` of a stolen encoder's output (a path to ``student.pt``, or a StolenEncoder)."""
    from stealer.student import load_student

    model = load_student(path) if isinstance(path, (str, Path)) else path
    return probe_encoder(encoder_fn(model), probe, channels=channels, image_size=image_size, seed=seed)


def load_images(shard_dir: str, n: int | None, *, channels: int, image_size: int,
                decoder: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images (uint8 ``[N, C, H, W]``) and labels of ``shard_dir``, decoded as the query phase
    decodes images for the victim (``decoder``; None: the stream's decode at ``image_size``)."""
    from stealer.data import ShardStream, open_shards

    stream = ShardStream(open_shards(shard_dir), batch_size=500, shuffle=False, channels=channels,
                         image_size=image_size, limit=n, decoder=decoder)
    batches = list(stream.iter_epoch(0))
    return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])


@torch.no_grad()
def encode(encoder: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """``encoder`` over ``images`` in batches of ``batch``, on CPU."""
    return torch.cat([encoder(images[i:i + batch]) for i in range(0, len(images), batch)]).cpu()


def honest_utility(row: Any, honest: Any, *, channels: int, image_size: int, seed: int) -> dict[str, Any]:
    """An honest user's view of a defended ``row`` (``stealer.defense_table.DefenseRow``): it queries
    ``honest.n_train + honest.n_test`` images of its downstream set (decoded as the row's query phase
    decodes them, ``row.decoder``) as user ``honest.user``, paid once; a linear probe is trained and scored on
    the *defended* answers. The perturbation is the mean L2 distance of those answers to the undefended ones
    passed through the user's secret transform when the chain has one (B4B): the noise, not the isometry."""
    kw = dict(channels=channels, image_size=image_size, decoder=row.decoder)
    xtr, ytr = load_images(honest.train, honest.n_train, **kw)
    xte, yte = load_images(honest.test, honest.n_test, **kw)
    images = torch.cat([xtr, xte])
    answers = row.cached_query(honest.user, images, row.dir / "honest", len(images))
    clean = encode(row.encoder, images)
    ref = row.reference(clean, honest.user)
    pert = (answers - ref).norm(dim=1) if answers.shape == ref.shape else torch.full((len(images),), float("nan"))
    res = linear_probe(answers[: len(xtr)], ytr, answers[len(xtr):], yte, steps=honest.steps, seed=seed)
    return {"honest_top1": res["top1"], "perturbation_l2": float(pert.mean()),
            "perturbation_rel": float(pert.mean() / clean.norm(dim=1).mean()), "honest_queries": len(images),
            "honest_coverage": row.coverage([honest.user])}


def watermark_verdicts(wm_ckpt: str | Path, wm_encoder: Any, stolen: dict[str, Any], nulls: dict[str, Any],
                       random_nulls: Callable[[int], list[Any]], *, alpha: float, seed: int, channels: int,
                       image_size: int) -> dict[str, Any]:
    """Test every ``stolen`` encoder (name → StolenEncoder) with the watermarked victim's rotation head
    (:func:`eval.watermark.verify_watermark`) against the null of independent encoders at false-positive rate
    ``alpha``: ``nulls`` (name → model; those whose output dim the head cannot read are left out) and
    ``random_nulls(head_dim)`` (random inits, named ``random_<i>``). Also the null's leave-one-out false
    positives and the watermarked victim's (``wm_encoder``) own rotation accuracy."""
    from eval.watermark import load_watermark_images, null_pvalue, rotation_accuracy, verify_watermark
    from victims.watermark import load_watermark, watermark_path

    head, meta = load_watermark(watermark_path(wm_ckpt))
    images = load_watermark_images(meta["data"], size=int(meta["size"]), channels=channels, image_size=image_size)
    nulls = {**nulls, **{f"random_{i}": m for i, m in enumerate(random_nulls(head.dim))}}
    null_acc = {}
    for k, m in nulls.items():
        if out_dim(m) == head.dim:  # copies of a victim with another output dim cannot wear this head
            c, n = rotation_accuracy(encoder_fn(m), head, images, seed=seed)
            null_acc[k] = c / n
    loo_fp = sum(null_pvalue(v, [w for j, w in null_acc.items() if j != k]) < alpha
                 for k, v in null_acc.items()) if len(null_acc) >= 3 else None
    victim_c, victim_n = rotation_accuracy(wm_encoder, head, images, seed=seed)
    verdicts = {name: verify_watermark(encoder_fn(m), head, images, null_accuracies=list(null_acc.values()),
                                       alpha=alpha, seed=seed) for name, m in stolen.items()}
    return {"verdicts": verdicts, "null_accuracies": null_acc, "null_leave_one_out_false_positives": loo_fp,
            "victim_accuracy": victim_c / victim_n, "n": victim_n, "alpha": alpha}
