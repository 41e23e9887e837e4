"""Shared test helpers."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for gloo rendezvous and test servers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tiny_steal_assets(root, sizes, image_size: int = 16):
    """Default data at ``sizes`` under ``root/data`` and a random tiny SimSiam victim (official
    format) at ``root/victim.pth.tar``; returns ``(root, victim_path)``."""
    import torch

    from stealer.shards import build_default_data
    from victims.simsiam import SimSiam, save_simsiam_checkpoint

    build_default_data(root / "data", image_size=image_size, sizes=sizes)
    torch.manual_seed(0)
    model = SimSiam("resnet18", dim=32, pred_dim=16, in_chans=1, width=8, stem="small")
    victim = root / "victim.pth.tar"
    save_simsiam_checkpoint(model, victim, epoch=0, arch="resnet18", extra={"image_size": image_size})
    return root, victim


class Died(BaseException):
    """A simulated death of the process: not an Exception, so nothing on the way may swallow it, like a kill."""


def die_at_cache_write(monkeypatch, cached: int) -> list[int]:
    """The steal's query phase dies at its cache write after ``cached`` batches are cached: that batch's
    charge is committed, its answers never reach the cache (the window a SIGKILL hits). Raises :class:`Died`
    there; returns the sizes of the batches cached before (``monkeypatch.undo()`` restores the writer)."""
    import stealer.steal as steal

    real, written = steal._cache_batch, []

    def dying(cache, keys, *rest):
        if len(written) == cached:
            raise Died()
        written.append(len(keys))
        return real(cache, keys, *rest)

    monkeypatch.setattr(steal, "_cache_batch", dying)
    return written
