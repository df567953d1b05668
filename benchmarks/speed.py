"""Training and sampling speed and peak memory through the real ``md4 fit`` path, sized by a config.

The shape (network, schedule, vocabulary, sequence length, per-device batch, sampling steps) comes
from the config YAMLs given with ``--config`` (a stack, as ``md4 fit`` takes them): the data module
the config names is built to read its vocabulary and length, and the model section's init_args go
to ``md4 fit`` as they are (for another method, those its class takes). Only the data is swapped for
random tokens of that shape in a memory-mapped ``TokenFileDataModule`` (a step costs the same
whatever the tokens).

Each training row is a fresh ``md4 fit`` process (so its peak memory is its own), timed by
:class:`StepTimer` after a warm-up. MD4's rows add one speed lever at a time, so each row's ratio to
the row above is that lever's effect; the other methods run with the levers that apply to them.
The first row is the anchor: the same network, loss, AdamW and precision as MD4's baseline in a plain
PyTorch loop (``benchmarks/bare_loop.py``: no Trainer, EMA, logger or data loader), in its own fresh
process before each run of the fit rows and timed alike; every row's "vs bare loop" is its steps/s
over the anchor's, i.e. what the framework around the step costs.
Sampling times ``process.sample`` with the output cache off, on, and on with a compiled network, in
one more fresh process that also records its memory before the model and at its peak.

    python -m benchmarks.speed                                              # configs/owt_tiny.yaml
    python -m benchmarks.speed --config configs/tiny_text.yaml --methods all --levers 1
    python -m benchmarks.speed --config configs/owt_small.yaml --methods all   # GPU: benchmarks/gpu.sh

MFU = FLOPs per step (Lightning's ``measure_flops`` of the network's forward and backward on the
meta device) x steps/s / the matmul peak measured in the same run (bf16 on a GPU, fp32 on the CPU,
where it is only relative).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import importlib
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
import yaml
from lightning.fabric.utilities.throughput import Throughput, measure_flops
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.cli import instantiate_class

from datamodules.base import per_device_batch
from lightning_md4.callbacks import SampleLogger
from lightning_md4.modules.registry import method_names
from lightning_md4.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "owt_tiny.yaml"
DEFAULT_EMA_DECAY = 0.9999  # for a config without an EMA callback

# Each lever adds to the row above it: (name, changes). The baseline turns off what the config may
# already switch on (ForeachEMA, chunked cross-entropy), so the chain starts from the plain path.
LEVERS: list[tuple[str, dict[str, Any]]] = [
    ("baseline", {}),
    ("foreach EMA", {"ema": "lightning_md4.speed_callbacks.ForeachEMA"}),
    ("progress bar every 50 steps", {"bar_refresh": 50}),
    ("torch.compile network", {"compile": True}),
    ("head on masked tokens only", {"logits_at": "masked"}),
    # Last, as it trades speed for memory: compare its peak memory with the row above.
    ("chunked float32 cross-entropy", {"ce_chunked": True}),
]
MD4_ONLY_LEVERS = ("logits_at", "ce_chunked")
# Every registered method (lightning_md4/modules/registry.py), MD4 first: its rows carry the levers.
METHODS = ("MD4", *(name for name in method_names() if name != "MD4"))
BARE_LOOP = "bare loop (plain PyTorch: no Lightning, EMA, logger)"  # the anchor row's levers label
TRAIN_COLUMNS = ["method", "levers", "params", "batch x seq", "steps/s", "tokens/s", "MFU %", "peak memory GiB",
                 "vs baseline", "vs bare loop", "CPU s/step", "vs bare loop, CPU time"]
SAMPLE_COLUMNS = ["output cache", "compile", "seconds", "tokens/s", "network evaluations", "speed-up vs off",
                  "same tokens as off"]


# -- the shape a config sets ---------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """What the benchmark takes from a config stack."""

    model: dict[str, Any]  # the config's model section: class_path and init_args
    vocab_size: int
    seq_len: int
    batch: int  # per device
    precision: str | None
    gradient_clip_val: float | None
    ema: dict[str, Any]  # init_args of the config's EMA callback
    sample_batch: int
    sample_steps: int
    sample_grid: str


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` over ``base`` as a later ``--config`` overrides an earlier one: dicts merge key by
    key, except that a section naming another ``class_path`` replaces the section."""
    out = dict(base)
    for key, value in overlay.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and \
                value.get("class_path", old.get("class_path")) == old.get("class_path"):
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out


def load_config(paths: list[Path]) -> dict[str, Any]:
    """The merged YAML of a config stack."""
    config: dict[str, Any] = {}
    for path in paths:
        config = merge(config, yaml.safe_load(Path(path).read_text()) or {})
    return config


def callback_args(config: dict[str, Any], base: type) -> dict[str, Any] | None:
    """init_args of the config's first callback that is a ``base`` (e.g. any EMAWeightAveraging)."""
    for callback in config.get("trainer", {}).get("callbacks", []) or []:
        if issubclass(import_class(callback["class_path"]), base):
            return dict(callback.get("init_args", {}))
    return None


def device_batch(data: Any, trainer: dict[str, Any]) -> int:
    """The data module's batch per device on the config's layout, by ``md4 fit``'s own rule."""
    if data.global_batch_size is None:
        return data.batch_size
    devices = trainer.get("devices", 1)
    return per_device_batch(data.global_batch_size, trainer.get("num_nodes", 1),
                            devices if isinstance(devices, int) else 1, trainer.get("accumulate_grad_batches", 1))


def config_shape(paths: list[Path], batch: int | None = None) -> Shape:
    """The benchmark's shape from the config stack ``paths``; ``batch`` overrides the per-device batch."""
    config = load_config(paths)
    trainer = config.get("trainer", {})
    data = instantiate_class((), config["data"])  # vocab_size and seq_len are set right after __init__
    sampler = callback_args(config, SampleLogger) or {}
    return Shape(
        model=config["model"], vocab_size=data.vocab_size, seq_len=data.seq_len,
        batch=batch or device_batch(data, trainer), precision=trainer.get("precision"),
        gradient_clip_val=trainer.get("gradient_clip_val"),
        ema=callback_args(config, EMAWeightAveraging) or {"decay": DEFAULT_EMA_DECAY},
        sample_batch=sampler.get("num_samples", 1), sample_steps=sampler.get("steps", 64),
        sample_grid=sampler.get("grid", "uniform"))


def method_model(shape: Shape, method: str, levers: dict[str, Any]) -> dict[str, Any]:
    """The model section for ``method``: the config's init_args (for another method than the config's,
    only those of the shared base, network and optimiser: a name like ``schedule`` means another
    thing to each method), plus MD4's levers."""
    class_path = f"lightning_md4.modules.{method}"
    same_method = shape.model.get("class_path", "").rsplit(".", 1)[-1] == method
    owner = class_path if same_method else "lightning_md4.modules.base.DiffusionModule"
    accepted = inspect.signature(import_class(owner)).parameters
    init_args = {k: copy.deepcopy(v) for k, v in shape.model.get("init_args", {}).items() if k in accepted}
    if method == "MD4":
        init_args["logits_at"] = levers.get("logits_at", "all")
        init_args["ce_chunk_rows"] = chunk_rows(shape) if levers.get("ce_chunked") else None
    return {"class_path": class_path, "init_args": init_args}


def import_class(class_path: str) -> type:
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def chunk_rows(shape: Shape) -> int:
    """The config's cross-entropy chunk, or a quarter of the batch's rows when it sets none."""
    return shape.model.get("init_args", {}).get("ce_chunk_rows") or max(1, shape.batch * shape.seq_len // 4)


def build_module(shape: Shape, method: str, levers: dict[str, Any] | None = None) -> pl.LightningModule:
    """The LightningModule ``md4 fit`` builds for ``method`` at this shape (on the current default device)."""
    section = method_model(shape, method, levers or {})
    return instantiate_class((shape.vocab_size, shape.seq_len), section)


def flops_per_step(shape: Shape, method: str) -> int:
    """FLOPs of one network forward and backward on a training batch, counted on the meta device."""
    with torch.device("meta"):
        module = build_module(shape, method)
        x = torch.zeros(shape.batch, shape.seq_len, dtype=torch.long)
        t = torch.zeros(shape.batch)
    return measure_flops(module.net, lambda: module.net(x, t), lambda out: out.sum())


# -- training rows (each a fresh `md4 fit` process) ----------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def process_cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children: on a shared CPU it
    varies less with other load than the wall clock does."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StepTimer(pl.Callback):
    """Times steps ``warmup .. warmup + steps``, records peak memory over them and writes JSON to ``output``.

    Hand-written rather than Lightning's ``ThroughputMonitor``, which synchronises the GPU after every
    step (a stall this benchmark measures the levers against): here only the two ends sync, and
    Lightning's ``Throughput`` does the arithmetic.
    """

    def __init__(self, warmup: int, steps: int, output: str, flops_per_batch: int = 0,
                 available_flops: float = 0.0) -> None:
        self.warmup, self.steps, self.output = warmup, steps, output
        self.flops_per_batch, self.available_flops = flops_per_batch, available_flops
        self.start = self.cpu_start = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        device = pl_module.device.type
        if trainer.global_step == self.warmup:
            sync(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self.start, self.cpu_start = time.perf_counter(), process_cpu_seconds()
        elif trainer.global_step == self.warmup + self.steps:
            sync(device)
            result = timed_result(time.perf_counter() - self.start, self.steps, batch["x0"], float(outputs["loss"]),
                                  pl_module, self.cpu_start, self.flops_per_batch, self.available_flops,
                                  trainer.world_size)
            Path(self.output).write_text(json.dumps(result))
            trainer.should_stop = True


def timed_result(seconds: float, steps: int, x0: torch.Tensor, loss: float, module: torch.nn.Module,
                 cpu_start: float, flops_per_batch: int, available_flops: float, world_size: int = 1) -> dict[str, Any]:
    """A row's record from ``steps`` steps of batch ``x0`` timed at ``seconds`` (fit rows and the bare loop)."""
    throughput = Throughput(available_flops=available_flops or None, world_size=world_size, window_size=2)
    batch, seq = x0.shape
    throughput.update(time=0.0, batches=0, samples=0, lengths=0, flops=0)
    throughput.update(time=seconds, batches=steps, samples=steps * batch, lengths=steps * batch * seq,
                      flops=steps * flops_per_batch)
    metrics = throughput.compute()
    peak = torch.cuda.max_memory_allocated() if x0.is_cuda else peak_rss_bytes()
    return {"steps_per_s": metrics["device/batches_per_sec"],
            "tokens_per_s": metrics["device/items_per_sec"] * world_size,
            "mfu": metrics.get("device/mfu"), "cpu_s_per_step": (process_cpu_seconds() - cpu_start) / steps,
            "peak_memory_gib": peak / 2**30, "loss": loss, "batch": batch, "seq_len": seq,
            "params": sum(p.numel() for p in module.parameters()), "threads": torch.get_num_threads()}


def token_file(shape: Shape, steps: int, folder: Path) -> Path:
    """A random token stream, enough for ``steps`` batches plus the held-out splits."""
    path = folder / f"tokens_{shape.vocab_size}.npy"
    n = (steps + 4) * shape.batch * shape.seq_len + 2 * shape.seq_len
    if not path.exists() or len(np.load(path, mmap_mode="r")) < n:
        rng = np.random.default_rng(0)
        np.save(path, rng.integers(0, shape.vocab_size, n, dtype=np.uint16 if shape.vocab_size < 65536 else np.int32))
    return path


@dataclass(frozen=True)
class Timing:
    """How long each training row runs and what its MFU is measured against."""

    warmup: int  # untimed steps (compilation, allocator warm-up)
    steps: int  # timed steps
    available_flops: float


def fit_config(shape: Shape, method: str, levers: dict[str, Any], timing: Timing, tokens: Path, run_dir: Path,
               result: Path) -> dict[str, Any]:
    """The ``md4 fit`` config of one row: the config's model and optimisation on random tokens."""
    ema_path = levers.get("ema", "lightning.pytorch.callbacks.EMAWeightAveraging")
    ema_args = shape.ema if ema_path.endswith("ForeachEMA") else {"decay": shape.ema.get("decay", DEFAULT_EMA_DECAY)}
    callbacks = [
        {"class_path": ema_path, "init_args": ema_args},
        {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar",
         "init_args": {"refresh_rate": levers.get("bar_refresh", 1)}},
        {"class_path": "benchmarks.speed.StepTimer",
         "init_args": {"warmup": timing.warmup, "steps": timing.steps, "output": str(result),
                       "flops_per_batch": flops_per_step(shape, method), "available_flops": timing.available_flops}},
    ]
    if levers.get("compile"):
        callbacks.append({"class_path": "lightning_md4.speed_callbacks.CompileNetwork"})
    return {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(run_dir), "max_steps": timing.warmup + timing.steps + 1,
            "precision": shape.precision, "devices": 1, "gradient_clip_val": shape.gradient_clip_val,
            "limit_val_batches": 0, "enable_checkpointing": False, "log_every_n_steps": 50, "callbacks": callbacks,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(run_dir), "name": "tensorboard"}},
        },
        "model": method_model(shape, method, levers),
        "data": {"class_path": "datamodules.tokens.TokenFileDataModule",
                 "init_args": {"path": str(tokens), "vocab_size": shape.vocab_size, "seq_len": shape.seq_len,
                               "val_tokens": shape.seq_len, "test_tokens": shape.seq_len, "batch_size": shape.batch,
                               "num_workers": 2 if torch.cuda.is_available() else 0}},
    }


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def run_child(module: str, args: list[str], result: Path) -> dict[str, Any]:
    """``python -m MODULE ARGS`` in a fresh process; the JSON it wrote to ``result``, or ``{"error": ...}``."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True)
    if proc.returncode != 0 or not result.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(result.read_text())


def fresh_run_dir(work: Path, name: str) -> tuple[Path, Path]:
    """A row's folder and its result file, removed if an earlier run left one."""
    run_dir = work / name
    run_dir.mkdir(parents=True, exist_ok=True)
    result = run_dir / "result.json"
    result.unlink(missing_ok=True)
    return run_dir, result


def train_row(shape: Shape, method: str, levers: dict[str, Any], timing: Timing, work: Path,
              label: str) -> dict[str, Any]:
    """One training row in a fresh ``md4 fit`` process; its result, or ``{"error": ...}``."""
    run_dir, result = fresh_run_dir(work, label.replace(" ", "_").replace(".", ""))
    config = run_dir / "config.json"
    tokens = token_file(shape, timing.warmup + timing.steps, work)
    config.write_text(json.dumps(fit_config(shape, method, levers, timing, tokens, run_dir, result), indent=1))
    return run_child("lightning_md4.cli", ["fit", "--config", str(config)], result)


def bare_row(shape: Shape, timing: Timing, work: Path) -> dict[str, Any]:
    """The anchor: ``benchmarks/bare_loop.py`` in a fresh process at this shape and timing, on the
    token file the fit rows read; its result, or ``{"error": ...}``."""
    run_dir, result = fresh_run_dir(work, "bare_loop")
    spec = {"shape": asdict(shape), "timing": asdict(timing), "output": str(result),
            "tokens": str(token_file(shape, timing.warmup + timing.steps, work)),
            "flops_per_batch": flops_per_step(shape, "MD4")}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    return run_child("benchmarks.bare_loop", [str(run_dir / "spec.json")], result)


def lever_chain(methods: tuple[str, ...], n_levers: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, label, levers) of every training row: MD4's cumulative levers, then the other methods."""
    chain: list[tuple[str, str, dict[str, Any]]] = []
    levers: dict[str, Any] = {}
    for name, change in LEVERS[:n_levers]:
        levers = {**levers, **change}
        chain.append(("MD4", name, levers))
    shared = {k: v for k, v in levers.items() if k not in MD4_ONLY_LEVERS}
    chain += [(m, "all levers that apply", shared) for m in methods if m != "MD4"]
    return chain


def train_rows(shape: Shape, methods: tuple[str, ...], n_levers: int, timing: Timing, work: Path,
               repeats: int) -> list[dict[str, Any]]:
    """The bare-loop anchor, then every training row, each the fastest of ``repeats`` runs of the
    whole chain (a busy CPU); the anchor runs before each chain, so the two interleave. A row keeps
    its fastest run's record, with ``cpu_s_per_step`` the least over its runs (the two minima may
    come from different runs) and every run's steps/s and CPU s/step in ``runs``."""
    chain = [("MD4", BARE_LOOP, None), *lever_chain(methods, n_levers)]
    rows: list[dict[str, Any]] = [{} for _ in chain]
    runs: list[list[dict[str, float]]] = [[] for _ in chain]
    for _ in range(repeats):
        for i, (method, label, levers) in enumerate(chain):
            measured = bare_row(shape, timing, work) if levers is None else \
                train_row(shape, method, levers, timing, work, f"{method}_{label}")
            row = {"method": method, "levers": label, **measured}
            print(row, flush=True)
            if "error" in row:
                rows[i] = rows[i] or row  # an error only where no run succeeded
                continue
            runs[i].append({"steps_per_s": row["steps_per_s"], "cpu_s_per_step": row["cpu_s_per_step"]})
            if row["tokens_per_s"] > rows[i].get("tokens_per_s", -1.0):
                rows[i] = row
    for row, its_runs in zip(rows, runs):
        if its_runs:
            row.update(runs=its_runs, cpu_s_per_step=min(r["cpu_s_per_step"] for r in its_runs))
    return rows


# -- sampling (one fresh process) ----------------------------------------------------------------
def sample_once(module: pl.LightningModule, shape: Shape, steps: int, cache: bool,
                device: str) -> tuple[float, int, torch.Tensor]:
    """Wall time, network evaluations and tokens of one sample, the same seed each time."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync(device)
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
        tokens, nfe = module.process.sample(module.net, (shape.sample_batch, shape.seq_len), steps,
                                            grid=shape.sample_grid, generator=gen, device=device, cache=cache,
                                            return_nfe=True)
    sync(device)
    return time.perf_counter() - start, nfe, tokens.cpu()


def sample_rows(shape: Shape, repeats: int, compile_row: bool = True) -> dict[str, Any]:
    """MD4's sampler with the output cache off, on, and (``compile_row``) on with a compiled network.

    The network is the config's with ``time_conditioning`` off: the cache reuses an output only when
    the network does not see t. Weights are untrained; the cost does not depend on them.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rss_before = peak_rss_bytes()
    torch.manual_seed(0)
    model = copy.deepcopy(shape.model)
    model.setdefault("init_args", {}).setdefault("network", {})["time_conditioning"] = False
    module = build_module(replace(shape, model=model), "MD4").to(device).eval()
    sample_once(module, shape, 8, cache=True, device=device)  # first-call costs outside the timings
    rows, reference = [], None
    for cache, compiled in ((False, False), (True, False), (True, True))[:3 if compile_row else 2]:
        if compiled:
            module.net.compile(dynamic=False)
            sample_once(module, shape, 8, cache=True, device=device)  # compilation
        runs = [sample_once(module, shape, shape.sample_steps, cache, device) for _ in range(repeats)]
        seconds, nfe, tokens = min(runs, key=lambda r: r[0])
        reference = tokens if reference is None else reference
        rows.append({"cache": cache, "compile": compiled, "seconds": seconds, "nfe": nfe,
                     "tokens_per_s": shape.sample_batch * shape.seq_len / seconds,
                     "same_tokens": bool(torch.equal(tokens, reference))})
    return {"rows": rows, "rss_before_model_gib": rss_before / 2**30, "peak_rss_gib": peak_rss_bytes() / 2**30}


def sample_in_subprocess(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`sample_rows` in a fresh interpreter (its peak memory is its own): its last stdout line."""
    argv = [sys.executable, "-m", "benchmarks.speed", "--sample-child",
            *[a for path in args.config for a in ("--config", str(path))], "--repeats", str(args.repeats),
            *(["--no-sample-compile"] if args.no_sample_compile else [])]
    for option in ("batch", "sample_batch", "sample_steps"):
        if getattr(args, option) is not None:
            argv += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    proc = subprocess.run(argv, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sampling failed with exit status {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the machine and the tables ------------------------------------------------------------------
def matmul_peak(device: str) -> float:
    """Measured FLOP/s of a large square matmul: bf16 on a GPU, fp32 on the CPU. Hand-written as
    Lightning's ``get_available_flops`` has no CPU entries and gives a card's datasheet, not what it delivers."""
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device == "cuda" else 5
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> float:
    """The machine's 1-minute load average: above the core count, other processes compete."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def ratio(value: float, reference: float | None) -> str | None:
    return f"{value / reference:.2f}x" if reference else None


def train_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One line per training row, failed rows keeping their error's last line. "vs baseline" is each
    row's steps/s over the first fit row's, "vs bare loop" over the anchor's; "vs bare loop, CPU
    time" is the anchor's CPU s/step over the row's (on a loaded machine the steadier of the two)."""
    rate = [r.get("steps_per_s") for r in rows]
    bare = next((v for r, v in zip(rows, rate) if r["levers"] == BARE_LOOP), None)
    bare_cpu = next((r.get("cpu_s_per_step") for r in rows if r["levers"] == BARE_LOOP), None)
    first = next((v for r, v in zip(rows, rate) if r["levers"] != BARE_LOOP and v is not None), None)
    table = []
    for r in rows:
        if "error" in r:
            table.append({"method": r["method"], "levers": r["levers"],
                          "steps/s": f"failed: {r['error'].splitlines()[-1][:120]}"})
            continue
        table.append({"method": r["method"], "levers": r["levers"], "params": f"{r['params']:,}",
                      "batch x seq": f"{r['batch']} x {r['seq_len']}", "steps/s": round(r["steps_per_s"], 3),
                      "tokens/s": round(r["tokens_per_s"]),
                      "MFU %": round(100 * r["mfu"], 1) if r.get("mfu") is not None else None,
                      "peak memory GiB": round(r["peak_memory_gib"], 2),
                      "vs baseline": ratio(r["steps_per_s"], first) if r["levers"] != BARE_LOOP else "-",
                      "vs bare loop": ratio(r["steps_per_s"], bare),
                      "CPU s/step": round(r["cpu_s_per_step"], 3),
                      "vs bare loop, CPU time": ratio(bare_cpu, r["cpu_s_per_step"]) if bare_cpu else None})
    return pd.DataFrame(table, columns=TRAIN_COLUMNS)


def sample_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    off = rows[0]["seconds"]
    return pd.DataFrame([{"output cache": "on" if r["cache"] else "off", "compile": "yes" if r["compile"] else "no",
                          "seconds": round(r["seconds"], 2), "tokens/s": round(r["tokens_per_s"], 1),
                          "network evaluations": r["nfe"], "speed-up vs off": f"{off / r['seconds']:.2f}x",
                          "same tokens as off": r["same_tokens"]} for r in rows], columns=SAMPLE_COLUMNS)


def report(meta: dict[str, Any], train: pd.DataFrame, sampling: dict[str, Any] | None) -> str:
    """The markdown the run writes: a header line, the training table and the sampling table."""
    shape = meta["shape"]
    text = (f"{' + '.join(meta['config'])} on {meta['device_name']}, {meta['threads']} threads, "
            f"matmul peak {meta['peak_flops'] / 1e12:.2f} TFLOP/s, load average {meta['load_average']['start']:.2f}"
            f" -> {meta['load_average']['end']:.2f}\n\n" + markdown_table(train))
    if sampling is not None:
        text += (f"\n\nSampling: batch {shape['sample_batch']} x {shape['seq_len']} tokens, {shape['sample_steps']} "
                 f"steps, {shape['sample_grid']} grid, untrained network without t; process memory "
                 f"{sampling['rss_before_model_gib']:.2f} GiB before the model, peak {sampling['peak_rss_gib']:.2f} GiB"
                 "\n\n" + markdown_table(sample_table(sampling["rows"])))
    return text + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, action="append", help=f"config YAML, repeatable (default {DEFAULT_CONFIG})")
    p.add_argument("--methods", default="MD4", help="comma list of methods, or 'all'")
    p.add_argument("--levers", type=int, default=len(LEVERS), help="use the first N levers (1: baseline only)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per training row")
    p.add_argument("--steps", type=int, default=10, help="timed steps per training row")
    p.add_argument("--batch", type=int, help="per-device batch (default: the config's)")
    p.add_argument("--sample-batch", type=int, help="default: the config's SampleLogger num_samples")
    p.add_argument("--sample-steps", type=int, help="default: the config's SampleLogger steps")
    p.add_argument("--repeats", type=int, default=1, help="keep each row's fastest of N runs (a busy CPU)")
    p.add_argument("--no-sampling", action="store_true")
    p.add_argument("--no-sample-compile", action="store_true", help="skip the compiled sampling row (slow to compile)")
    p.add_argument("--work", default="/tmp/md4_speed", help="scratch folder for token files and runs")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--sample-child", action="store_true", help=argparse.SUPPRESS)  # internal: sampling, JSON out
    args = p.parse_args(argv)
    args.config = args.config or [DEFAULT_CONFIG]
    return args


def args_shape(args: argparse.Namespace) -> Shape:
    shape = config_shape(args.config, args.batch)
    overrides = {"sample_batch": args.sample_batch, "sample_steps": args.sample_steps}
    return replace(shape, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> Path:
    """Run the benchmark; returns the stem of the ``.json`` and ``.md`` it wrote."""
    args = parse_args(argv)
    shape = args_shape(args)
    if args.sample_child:
        print(json.dumps(sample_rows(shape, args.repeats, not args.no_sample_compile)))
        return Path()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    methods = METHODS if args.methods == "all" else tuple(args.methods.split(","))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_start = load_average()
    if load_start > (os.cpu_count() or 1) / 2:
        print(f"warning: load average {load_start:.2f}: other processes compete for the CPU", flush=True)
    peak = matmul_peak(device)
    device_name = torch.cuda.get_device_name() if device == "cuda" else cpu_model()
    print(f"{device_name}: matmul peak {peak / 1e12:.3f} TFLOP/s; shape {shape}", flush=True)
    timing = Timing(args.warmup, args.steps, peak)
    rows = train_rows(shape, methods, args.levers, timing, work, args.repeats)
    sampling = None if args.no_sampling else sample_in_subprocess(args)
    meta = {"config": [str(p) for p in args.config], "shape": asdict(shape), "timing": asdict(timing),
            "device": device, "device_name": device_name, "threads": torch.get_num_threads(),
            "load_average": {"start": load_start, "end": load_average()}, "peak_flops": peak,
            "torch": torch.__version__, "lightning": lightning.__version__, "python": platform.python_version(),
            "command": " ".join(sys.argv)}
    text = report(meta, train_table(rows), sampling)
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"speed_{Path(args.config[-1]).stem}_{device}_{dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "train": rows, "sample": sampling}, indent=1))
    stem.with_suffix(".md").write_text(text)
    print(f"wrote {stem}.json and .md")
    return stem


if __name__ == "__main__":
    main()
