#!/usr/bin/env python
"""One-shot GPU suite: every hot path of a ResNet-50 -> ResNet-50 steal at 224 px against its
plain baseline, each ratio measured in the same run, written as JSON + Markdown.

    bash benchmarks/gpu_suite.sh                                  # one GPU node, <= 8 min
    python benchmarks/gpu_suite.py --out runs/gpu_suite           # the same
    python benchmarks/gpu_suite.py --tiny --cpu --out /tmp/suite  # CPU smoke (tests/test_benchmarks.py)

Rows (``suite.json`` -> ``rows``, ``suite.md``):

* ``online_step``: victim forward through ``VictimAPI.query`` (ledger + bf16 forward) + the
  cached step below, ÷ a plain supervised step of the same student (fwd/bwd + CE + SGD).
* ``cached_step``: the train phase's step on cached answers (``Attack.step``: host->device copy,
  augment, student fwd/bwd, InfoNCE, LARS, schedule) ÷ the plain supervised step.
* ``query_phase``: ``run_query_phase`` img/s on JPEG shards (decode in loader workers, ledger,
  victim, cache write) ÷ plain bf16 inference of the same victim on device-resident tensors.
* ``loader_cpu`` / ``loader_device``: ``ShardStream`` img/s with PIL decode in workers, and with
  ``data.decode=device`` (``stealer/device_decode.py``: nvJPEG on a GPU) ÷ the cached step's img/s
  (>= 1: the loader keeps the GPU fed).
* ``compile``: the cached step with ``torch.compile`` ÷ eager (img/s; compile time recorded).
* ``memory_256`` / ``max_batch``: ``torch.cuda.max_memory_allocated`` of the cached step at
  batch 256, and the largest batch that fits (doubling, then bisection, OOM caught; capped).
* ``multi_gpu``: all GPUs (``torchrun`` subprocess, DDP through accelerate, InfoNCE negatives
  gathered) ÷ one GPU, img/s.

Every model, loss, optimiser, stream and victim is the project's own (``StolenEncoder``,
``build_optimizer``, ``get_loss``, ``get_attack(...).step``, ``ShardStream``, ``VictimAPI``,
``run_query_phase``), configured as ``launch/steal.py`` would configure them from the config
``train.mixed_precision=bf16 train.channels_last=true``. Each section has a time cap and the whole
run stops starting sections when ``--budget`` seconds are near; a section that is skipped (not on a
GPU, one GPU only, out of time, or failed) records why. Timings are never asserted.
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stealer.dist import make_accelerator  # noqa: E402
from stealer.attacks import StepContext, get_attack  # noqa: E402
from stealer.config import load_config  # noqa: E402
from stealer.data import ShardStream, open_shards  # noqa: E402
from stealer.losses import get_loss  # noqa: E402
from stealer.optim import build_optimizer, build_schedule  # noqa: E402
from stealer.shards import write_shards  # noqa: E402
from stealer.steal import FUSED_OPTIMIZERS, StealConfig, run_query_phase  # noqa: E402
from stealer.student import StolenEncoder  # noqa: E402
from victims.api import VictimAPI  # noqa: E402
from victims.ledger import QueryLedger  # noqa: E402
from victims.simsiam import random_victim  # noqa: E402

FULL = {"arch": "resnet50", "width": 64, "stem": "imagenet", "size": 224, "channels": 3, "batch": 256,
        "steps": 20, "warmup": 5, "queries": 4096, "src_size": [320, 256], "max_batch_cap": 4096}
TINY = {"arch": "resnet18", "width": 8, "stem": "small", "size": 32, "channels": 3, "batch": 16,
        "steps": 2, "warmup": 1, "queries": 64, "src_size": [48, 40], "max_batch_cap": 64}
# the longest each section may run (seconds, full size); the budget guard may cut them shorter
SECTION_CAP = {"steps": 60, "query_phase": 60, "loader": 60, "compile": 150, "memory": 60, "multi_gpu": 120}
ROWS = ["online_step", "cached_step", "query_phase", "loader_cpu", "loader_device", "compile", "memory_256",
        "max_batch", "multi_gpu"]


class Budget:
    """The whole run's deadline; a section starts only with ``need`` seconds left."""

    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def cap(self, section: str, scale: float) -> float:
        return max(1.0, min(SECTION_CAP[section] * scale, self.left() - 5))


def timed_steps(fn: Callable[[], Any], steps: int, warmup: int, sync: Callable[[], None], max_s: float) -> tuple[float, int]:
    """Seconds per call of ``fn`` over up to ``steps`` calls after ``warmup`` (at least one timed
    call; stops early past ``max_s``); returns (seconds per call, calls timed)."""
    t = time.perf_counter()
    for _ in range(warmup):
        fn()
        if time.perf_counter() - t > max_s / 2:
            break
    sync()
    t, n = time.perf_counter(), 0
    while n < steps:
        fn()
        n += 1
        if time.perf_counter() - t > max_s:
            sync()  # the clock check above saw queued, not finished, work
            if time.perf_counter() - t > max_s:
                break
    sync()
    return (time.perf_counter() - t) / n, n


def synthetic_jpegs(n: int, unique: int, size: tuple[int, int], channels: int, seed: int = 0) -> list[bytes]:
    """``unique`` photo-like JPEGs (smooth noise, quality 90) repeated to ``n``: the decoder does
    the work of ``n`` images; the generator pays for ``unique``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for _ in range(min(n, unique)):
        small = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        arr = np.clip(np.asarray(im, dtype=np.int16) + rng.integers(-12, 13, size=(h, w, 3)), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr).convert("L" if channels == 1 else "RGB")
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return [out[i % len(out)] for i in range(n)]


class Suite:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.p = dict(TINY if a.tiny else FULL)
        for k in ("batch", "steps", "warmup", "queries"):
            if getattr(a, k) is not None:
                self.p[k] = getattr(a, k)
        self.scale = 0.1 if a.tiny else 1.0
        self.budget = Budget(a.budget)
        self.acc = make_accelerator(cpu=a.cpu, mixed_precision="bf16" if not a.cpu and torch.cuda.is_available() else a.cpu_precision)
        self.dev = self.acc.device
        self.cuda = self.dev.type == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.workers = a.workers if a.workers is not None else (1 if a.tiny else min(16, os.cpu_count() or 1))
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_suite-"))
        self.rows: dict[str, dict[str, Any]] = {}
        self.shared: dict[str, Any] = {}

    # -- helpers ---------------------------------------------------------------------------
    def cfg(self, *overrides: str) -> StealConfig:
        p = self.p
        return load_config(StealConfig, None, [
            f"out_dir={self.tmp}", "name=suite", f"data.query={self.tmp}/query", f"data.image_size={p['size']}",
            f"data.channels={p['channels']}", f"data.workers={self.workers}", f"query.batch_size={p['batch']}",
            f"student.arch={p['arch']}", f"student.width={p['width']}", f"student.stem={p['stem']}",
            f"train.batch_size={p['batch']}", f"train.channels_last={str(self.cuda).lower()}",
            f"train.mixed_precision={'bf16' if self.cuda else 'auto'}", "victim.precision=auto", *overrides])

    def row(self, name: str, label: str, measured: dict[str, float] | None = None, ratio: float | None = None,
            note: str = "", skip: str | None = None) -> None:
        self.rows[name] = {"label": label, "measured": {k: round(float(v), 6) for k, v in (measured or {}).items()},
                           "ratio": None if ratio is None else round(float(ratio), 4), "note": note, "skip": skip}

    def batch(self, n: int, generator_seed: int = 0) -> dict[str, Any]:
        """A cached-answer batch as the train stream yields it: uint8 images and float32 answers on
        the host (pinned on a GPU), its canonical index."""
        p, g = self.p, torch.Generator().manual_seed(generator_seed)
        img = torch.randint(0, 256, (n, p["channels"], p["size"], p["size"]), dtype=torch.uint8, generator=g)
        resp = torch.randn(n, self.shared["dim"], generator=g)
        lab = torch.randint(0, 1000 if not self.a.tiny else 10, (n,), generator=g)
        if self.cuda:
            img, resp, lab = img.pin_memory(), resp.pin_memory(), lab.pin_memory()
        return {"image": img, "response": resp, "label": lab, "index": 0, "corrupt": 0}

    def student(self, cfg: StealConfig, out_dim: int, optimizer: str | None = None, compile_: bool = False) -> StepContext:
        """The student, optimiser, schedule and loss exactly as ``run_train_phase`` builds them."""
        acc = self.acc
        torch.manual_seed(cfg.seed)
        st = StolenEncoder(cfg.student.arch, out_dim, in_chans=cfg.data.channels, width=cfg.student.width,
                           stem=cfg.student.stem, image_size=cfg.data.image_size)
        if optimizer is not None:
            st = st.to(acc.device)
        name = optimizer or cfg.train.optimizer
        fused = name in FUSED_OPTIMIZERS and (cfg.train.fused is True or (cfg.train.fused == "auto" and self.cuda))
        opt = build_optimizer(name, st, lr=cfg.train.lr if optimizer is None else 0.1, weight_decay=cfg.train.weight_decay,
                              momentum=cfg.train.momentum, **({"fused": True} if fused else {}))
        sched = build_schedule(opt, 10_000, 10, cfg.train.final_lr_fraction)
        if cfg.train.channels_last:
            st = st.to(memory_format=torch.channels_last)
        if optimizer is None:
            model, opt = acc.prepare(st, opt)
            raw = acc.unwrap_model(model)
        else:  # the baseline: not handed to the accelerator, which would keep it alive after the section
            model = raw = st.to(acc.device)
        if compile_:
            model = torch.compile(model)
        model.train()
        return StepContext(cfg, acc, model, raw, opt, sched, get_loss(cfg.train.loss), acc.process_index, {})

    def plain_step(self, ctx: StepContext, batch: dict[str, Any]) -> Callable[[], None]:
        """The baseline: a plain supervised step of the same student (same input path and precision)."""
        acc = ctx.acc

        def step() -> None:
            x = batch["image"].to(acc.device, non_blocking=True)
            if ctx.cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = batch["label"].to(acc.device, non_blocking=True)
            x = ctx.raw.preprocess(x)
            with acc.autocast():
                loss = torch.nn.functional.cross_entropy(ctx.model(x).float(), y)
            ctx.opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            ctx.opt.step()
        return step

    def cached_step(self, ctx: StepContext, batch: dict[str, Any]) -> Callable[[], None]:
        attack = get_attack(ctx.cfg.attack.name)
        return lambda: attack.step(ctx, batch, 0)

    def mem_reset(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    # -- sections --------------------------------------------------------------------------
    def setup(self) -> None:
        p = self.p
        self.victim = random_victim(p["arch"], in_chans=p["channels"], width=p["width"], stem=p["stem"], image_size=p["size"])
        self.shared["dim"] = int(self.victim.out_dim)
        self.api = VictimAPI(self.victim, QueryLedger(self.tmp / "ledger.sqlite"), device=self.dev, precision="auto")
        jpegs = synthetic_jpegs(p["queries"], 64 if self.a.tiny else 256, tuple(p["src_size"]), p["channels"])
        samples = ((f"q-{i:07d}", b, "jpg", i % 10) for i, b in enumerate(jpegs))
        write_shards(samples, self.tmp / "query", samples_per_shard=max(16, p["queries"] // max(1, 2 * self.workers)),
                     source="gpu_suite synthetic JPEGs", classes=[str(i) for i in range(10)], channels=p["channels"],
                     image_size=None)

    def steps(self) -> None:
        p, cap = self.p, self.budget.cap("steps", self.scale)
        cfg = self.cfg()
        b = self.batch(p["batch"])
        plain = self.student(cfg, 1000 if not self.a.tiny else 10, optimizer="sgd")
        t_plain, n_plain = timed_steps(self.plain_step(plain, b), p["steps"], p["warmup"], self.sync, cap / 3)
        del plain
        gc.collect()
        self.mem_reset()
        ctx = self.student(cfg, self.shared["dim"])
        t_cached, n_cached = timed_steps(self.cached_step(ctx, b), p["steps"], p["warmup"], self.sync, cap / 3)
        peak = torch.cuda.max_memory_allocated() if self.cuda else None
        attack = get_attack(cfg.attack.name)
        img_dev = b["image"]

        def online() -> None:
            y = self.api.query(img_dev, "suite")  # charged, bf16 forward, answers on the device
            attack.step(ctx, {**b, "response": y}, 0)
        t_online, n_online = timed_steps(online, p["steps"], p["warmup"], self.sync, cap / 3)
        self.shared.update(ctx=ctx, batch=b, cached_ips=p["batch"] / t_cached, t_cached=t_cached)
        self.row("cached_step", "cached-answer train step ÷ plain supervised step (time per step)",
                 {"cached_step_s": t_cached, "plain_step_s": t_plain, "cached_img_s": p["batch"] / t_cached,
                  "plain_img_s": p["batch"] / t_plain}, t_cached / t_plain,
                 note=f"{n_cached} and {n_plain} timed steps; ideal ~1")
        self.row("online_step", "online steal step (VictimAPI.query + cached step) ÷ plain supervised step (time per step)",
                 {"online_step_s": t_online, "plain_step_s": t_plain}, t_online / t_plain,
                 note=f"{n_online} timed steps; ideal ~1.33 for R50->R50 (victim fwd ~1/3 of a fwd/bwd)")
        if peak is not None and p["batch"] == 256:
            self.shared["peak_256"] = peak

    def query_phase(self) -> None:
        p, cap = self.p, self.budget.cap("query_phase", self.scale)
        n = p["queries"]
        cfg = self.cfg("name=suite_query")
        self.sync()
        t = time.perf_counter()
        out = run_query_phase(cfg, self.api, self.acc)
        self.sync()
        q_ips = out["queries_sent"] / (time.perf_counter() - t)
        if out["queries_sent"] != n:
            raise RuntimeError(f"the query phase sent {out['queries_sent']} of {n} queries")
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.api.precision)
        x = self.batch(p["batch"])["image"].to(self.dev)
        enc = self.api.encoder

        def infer() -> None:  # the same forward at the same precision on device tensors, nothing else
            with torch.no_grad(), torch.autocast(self.dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                enc(x)
        t_inf, _ = timed_steps(infer, p["steps"], p["warmup"], self.sync, cap / 2)
        inf_ips = p["batch"] / t_inf
        self.row("query_phase", "query phase ÷ plain inference of the victim (img/s)",
                 {"query_phase_img_s": q_ips, "plain_inference_img_s": inf_ips}, q_ips / inf_ips,
                 note=f"{n} JPEGs {p['src_size'][0]}x{p['src_size'][1]} -> {p['size']} px, {self.workers} decode workers, "
                      f"victim precision {self.api.precision}; ideal ~1")

    def _loader_ips(self, decode_device: torch.device | None, max_s: float) -> tuple[float, int]:
        p = self.p
        stream = ShardStream(open_shards(self.tmp / "query"), batch_size=p["batch"], seed=0, shuffle=True,
                             workers=self.workers, channels=p["channels"], image_size=p["size"],
                             pin_memory=self.cuda, decode_device=decode_device)
        n, t = 0, time.perf_counter()
        for batch in stream.iter_epoch(0):
            n += int(batch["image"].shape[0])
            if time.perf_counter() - t > max_s:
                break
        self.sync()
        return n / (time.perf_counter() - t), n

    def loader(self) -> None:
        cap = self.budget.cap("loader", self.scale)
        ips = self.shared["cached_ips"]
        for name, dev, what in (("loader_cpu", None, "PIL decode in loader workers"),
                                ("loader_device", self.dev, "data.decode=device (nvJPEG on a GPU; libjpeg-turbo on a CPU)")):
            r, n = self._loader_ips(dev, cap / 2)
            self.row(name, f"loader img/s ({what}) ÷ cached train step img/s",
                     {"loader_img_s": r, "step_img_s": ips}, r / ips,
                     note=f"{n} images, {self.workers} workers, worker start-up included; >= 1 keeps the step fed")

    def compile(self) -> None:
        if not self.cuda and not self.a.compile:
            self.row("compile", "torch.compile cached step ÷ eager (img/s)",
                     skip="not run on a CPU (inductor's C++ build takes minutes there); pass --compile to force")
            return
        p, cap = self.p, self.budget.cap("compile", self.scale)
        if self.budget.left() < 0.8 * SECTION_CAP["compile"] * self.scale:  # compiling cannot be cut short
            self.row("compile", "torch.compile cached step ÷ eager (img/s)",
                     skip=f"out of time: {self.budget.left():.0f} s left, compiling may take {SECTION_CAP['compile'] * self.scale:.0f} s")
            return
        cfg = self.cfg("train.compile=true")
        ctx = self.student(cfg, self.shared["dim"], compile_=True)
        b = self.shared["batch"]
        step = self.cached_step(ctx, b)
        t = time.perf_counter()
        step()
        step()  # the first calls compile (forward, backward, the optimizer's step)
        self.sync()
        t_compile = time.perf_counter() - t
        t_c, n = timed_steps(step, p["steps"], 0, self.sync, max(1.0, cap - t_compile))
        eager = self.shared["t_cached"]
        self.row("compile", "torch.compile cached step ÷ eager (img/s)",
                 {"compiled_img_s": p["batch"] / t_c, "eager_img_s": p["batch"] / eager, "compile_s": t_compile},
                 eager / t_c, note=f"{n} timed steps after 2 compiling calls; > 1 = compile is faster")
        del ctx
        self.mem_reset()

    def memory(self) -> None:
        if not self.cuda:
            for name in ("memory_256", "max_batch"):
                self.row(name, "peak memory of the cached step" if name == "memory_256" else "largest batch that fits",
                         skip="CUDA only (torch.cuda.max_memory_allocated, out-of-memory probing)")
            return
        cap_s = self.budget.cap("memory", self.scale)
        p = self.p
        ctx = self.shared.pop("ctx")
        total = torch.cuda.get_device_properties(self.dev).total_memory
        if "peak_256" not in self.shared:
            b = self.batch(256)
            self.mem_reset()
            for _ in range(2):
                self.cached_step(ctx, b)()
            self.sync()
            self.shared["peak_256"] = torch.cuda.max_memory_allocated()
        peak = self.shared["peak_256"]
        self.row("memory_256", "peak memory of the cached step at batch 256 ÷ device memory",
                 {"peak_bytes": peak, "device_bytes": total}, peak / total, note=f"{peak / 2**30:.2f} GiB")
        t0 = time.perf_counter()

        def fits(n: int) -> bool:
            self.mem_reset()
            try:
                b = {k: (v.to(self.dev) if isinstance(v, torch.Tensor) else v) for k, v in self.batch(n).items()}
                self.cached_step(ctx, b)()  # noqa: F821 - the method's ctx (ruff is misled by its later del)
                self.sync()
                return True
            except torch.OutOfMemoryError:
                return False
            finally:
                ctx.opt.zero_grad(set_to_none=True)  # noqa: F821 - the method's ctx (ruff is misled by its later del)
                self.mem_reset()

        lo, hi, cap = 256, None, int(p["max_batch_cap"])
        n = 512
        while n <= cap and time.perf_counter() - t0 < cap_s:
            if not fits(n):
                hi = n
                break
            lo, n = n, n * 2
        while hi is not None and hi - lo > 32 and time.perf_counter() - t0 < cap_s:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        capped = hi is None and lo >= cap // 2 and n > cap
        self.row("max_batch", "largest batch of the cached step that fits ÷ 256",
                 {"max_batch": lo, "cap": cap}, lo / 256,
                 note=("hit the cap" if capped else f"first failure at {hi}" if hi else "stopped by the time cap")
                 + f"; {time.perf_counter() - t0:.0f} s of probing")
        del ctx
        self.acc.free_memory()  # the accelerator's references to the student, so the compile row starts clean

    def multi_gpu(self) -> None:
        n = self.a.ddp_procs or (torch.cuda.device_count() if self.cuda else 0)
        if n < 2:
            self.row("multi_gpu", "all GPUs ÷ one GPU (cached step img/s)",
                     skip="one GPU here" if self.cuda else "no GPUs (pass --ddp-procs 2 to exercise the path with CPU processes)")
            return
        cap = self.budget.cap("multi_gpu", self.scale)
        p = self.p
        res = self.tmp / "ddp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(Path(__file__).resolve()), "--child-ddp", str(res), "--out", str(self.tmp / "child"),
               "--batch", str(p["batch"]), "--steps", str(p["steps"]), "--warmup", str(p["warmup"])]
        cmd += ["--tiny"] if self.a.tiny else []
        cmd += ["--cpu"] if not self.cuda else []
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        # start-up (torchrun, n imports, process group) is paid on top of the timed steps
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(90.0, min(cap + 60, self.budget.left() - 5)),
                              env=env)
        if proc.returncode != 0 or not res.is_file():
            raise RuntimeError(f"torchrun exited {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}")
        child = json.loads(res.read_text())
        one = self.shared["cached_ips"]
        self.row("multi_gpu", f"{n} {'GPUs' if self.cuda else 'CPU processes'} ÷ one (cached step img/s, global batch {n}x{p['batch']})",
                 {"all_img_s": child["img_s"], "one_img_s": one, "processes": n}, child["img_s"] / one,
                 note=f"ideal {n}; scaling efficiency {child['img_s'] / one / n:.2f}")

    # -- driver ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        order = [("setup", None), ("steps", ["cached_step", "online_step"]), ("query_phase", ["query_phase"]),
                 ("loader", ["loader_cpu", "loader_device"]), ("memory", ["memory_256", "max_batch"]),
                 ("compile", ["compile"]), ("multi_gpu", ["multi_gpu"])]
        needs = {"loader": "steps", "compile": "steps", "memory": "steps", "multi_gpu": "steps", "query_phase": "setup",
                 "steps": "setup"}
        done: set[str] = set()
        timings: dict[str, float] = {}
        for section, rows in order:
            t = time.perf_counter()
            why = None
            if section != "setup" and self.budget.left() < 15:
                why = f"out of time (budget {self.a.budget:.0f} s)"
            elif needs.get(section) and needs[section] not in done:
                why = f"needs the {needs[section]} section, which did not finish"
            if why is None:
                try:
                    getattr(self, section)()
                    done.add(section)
                except Exception as e:  # noqa: BLE001 - one section failing leaves the others' figures
                    why = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                    traceback.print_exc()
            for r in rows or []:
                if why is not None and (r not in self.rows or section in ("steps",)):
                    self.rows[r] = {"label": r, "measured": {}, "ratio": None, "note": "", "skip": why}
            timings[section] = round(time.perf_counter() - t, 2)
            print(f"[gpu_suite] {section}: {timings[section]:.1f} s" + (f" (skipped: {why})" if why else ""), flush=True)
        dev = torch.cuda.get_device_name(self.dev) if self.cuda else f"cpu x{torch.get_num_threads()} threads"
        p = self.p
        return {"device": dev, "gpus": torch.cuda.device_count() if self.cuda else 0, "tiny": self.a.tiny,
                "model": f"{p['arch']} width {p['width']} stem {p['stem']} -> same, {p['channels']}x{p['size']}x{p['size']}, "
                         f"batch {p['batch']}, {'bf16 autocast, channels_last' if self.cuda else 'fp32 (CPU)'}",
                "workers": self.workers, "torch": torch.__version__, "section_s": timings,
                "elapsed_s": round(time.perf_counter() - self.budget.t0, 1), "budget_s": self.a.budget,
                "rows": {r: self.rows[r] for r in ROWS}}


def child_ddp(a: argparse.Namespace) -> None:
    """One torchrun process: the cached step under DDP (InfoNCE negatives gathered across ranks)."""
    suite = Suite(a)
    suite.shared["dim"] = int(random_victim(suite.p["arch"], in_chans=suite.p["channels"], width=suite.p["width"],
                                            stem=suite.p["stem"], image_size=suite.p["size"]).out_dim)
    ctx = suite.student(suite.cfg(), suite.shared["dim"])
    b = suite.batch(suite.p["batch"], generator_seed=suite.acc.process_index)
    t, _ = timed_steps(suite.cached_step(ctx, b), suite.p["steps"], suite.p["warmup"], suite.sync, 60.0 * suite.scale + 30)
    ips = torch.tensor([suite.p["batch"] / t], device=suite.dev)
    total = float(suite.acc.reduce(ips, reduction="sum").item())
    if suite.acc.is_main_process:
        Path(a.child_ddp).write_text(json.dumps({"img_s": total, "world": suite.acc.num_processes}))
    suite.acc.wait_for_everyone()
    shutil.rmtree(suite.tmp, ignore_errors=True)


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# GPU suite: {res['device']}", "", f"{res['model']}; {res['workers']} loader workers; torch {res['torch']}; "
             f"{res['elapsed_s']} s of a {res['budget_s']:.0f} s budget.", "",
             "| row | ratio | measured | note |", "|---|---|---|---|"]
    for name, r in res["rows"].items():
        if r["skip"]:
            lines.append(f"| {r['label']} | — | — | skipped: {r['skip']} |")
            continue
        meas = ", ".join(f"{k} {v:.4g}" for k, v in r["measured"].items())
        lines.append(f"| {r['label']} | **{r['ratio']:.3g}×** | {meas} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for suite.json and suite.md")
    p.add_argument("--tiny", action="store_true", help="resnet18 width 8 at 32 px, 2 steps: the CPU smoke run of the test suite")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480 = 8 min)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--queries", type=int, default=None, help="JPEGs in the query phase and loader rows")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: min(16, cores); 1 with --tiny)")
    p.add_argument("--compile", action="store_true", help="run the compile row on a CPU too")
    p.add_argument("--ddp-procs", type=int, default=None, help="processes of the multi_gpu row (default: every GPU)")
    p.add_argument("--cpu-precision", default="no", choices=["no", "bf16"], help=argparse.SUPPRESS)
    p.add_argument("--child-ddp", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child_ddp:
        child_ddp(a)
        return
    if a.budget < 30:
        raise SystemExit(f"--budget {a.budget:g} is too short to measure anything; give at least 30 seconds")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    suite = Suite(a)
    try:
        res = suite.run()
    finally:
        shutil.rmtree(suite.tmp, ignore_errors=True)
    (out / "suite.json").write_text(json.dumps(res, indent=1))
    (out / "suite.md").write_text(markdown(res))
    print(json.dumps(res, indent=1))
    print(markdown(res))


if __name__ == "__main__":
    main()
