"""Training and sampling speed through the real ``md4 fit`` path, one lever at a time.

Each training row is a fresh ``md4 fit`` process (the real LightningModule, AdamW, EMA, logger,
progress bar and memory-mapped data loader) on a random token file, timed by a callback between
two synchronised points after a warm-up; each row adds one lever to the row above, so the table
reads as a before/after list. Sampling rows time ``model.sample`` on the same network.

    python -m benchmarks.speed --size tiny                  # CPU: the before/after table
    python -m benchmarks.speed --size md4s --methods all    # GPU: what benchmarks/gpu.sh runs

MFU = tokens/s x model FLOPs per token / the matmul peak measured in the same run (bf16 on a
GPU, fp32 on the CPU). FLOPs per token = 6 x per-token matmul parameters + 12 x layers x d x
seq (attention) + 6 x d x vocab (head), the count the issue quotes (854M for MD4-S).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Size:
    """One benchmarked shape."""

    vocab_size: int
    seq_len: int
    batch: int
    n_layers: int
    d_model: int
    n_heads: int
    warmup: int  # untimed steps (compilation, allocator warm-up)
    steps: int  # timed steps
    sample_batch: int
    sample_steps: int
    ce_chunk_rows: int  # for the chunked cross-entropy lever: a quarter of the batch's rows


SIZES = {
    # The digits network at a GPT-2 vocabulary: the head dominates, as it does at scale.
    "tiny": Size(50257, 128, 8, 2, 128, 4, warmup=3, steps=10, sample_batch=4, sample_steps=512, ce_chunk_rows=256),
    # Between tiny and MD4-S, for a CPU run of a few minutes.
    "small": Size(50257, 256, 8, 4, 256, 4, warmup=3, steps=6, sample_batch=4, sample_steps=256, ce_chunk_rows=512),
    # MD4-S (issue 8): 12 x 768 x 12 heads, seq 1024, batch 32, GPT-2 vocabulary.
    "md4s": Size(50257, 1024, 32, 12, 768, 12, warmup=10, steps=30, sample_batch=32, sample_steps=1000,
                 ce_chunk_rows=8192),
}

# Each lever adds to the row above it: (name, config changes).
LEVERS: list[tuple[str, dict[str, Any]]] = [
    ("baseline", {}),
    ("foreach EMA", {"ema": "lightning_md4.speed_callbacks.ForeachEMA"}),
    ("progress bar every 50 steps", {"bar_refresh": 50}),
    ("torch.compile network", {"compile": True}),
    ("head on masked tokens only", {"logits_at": "masked"}),
    # Last, as it trades speed for memory: compare its peak memory with the row above.
    ("chunked float32 cross-entropy", {"ce_chunked": True}),
]
METHODS = ("MD4", "GenMD4", "SEDD", "D3PM")


def flops_per_token(size: Size) -> float:
    """Model FLOPs per token of one training step (forward + backward), as in the module docstring."""
    d, L = size.d_model, size.n_layers
    hidden = int(4.0 * d * 2 / 3)
    matmul_params = L * (4 * d * d + d * 2 * hidden + hidden * d)
    return 6 * matmul_params + 12 * L * d * size.seq_len + 6 * d * size.vocab_size


def matmul_peak(device: str) -> float:
    """Measured FLOP/s of a large square matmul: bf16 on a GPU, fp32 on the CPU."""
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (2048, torch.float32)
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


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def process_cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children: on a shared CPU it
    varies less with other load than the wall clock does."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class StepTimer(pl.Callback):
    """Times steps ``warmup .. warmup + steps`` with a device sync at the two ends only, records peak
    memory over the timed steps, and writes the result as JSON to ``output``."""

    def __init__(self, warmup: int, steps: int, output: str) -> None:
        self.warmup, self.steps, self.output = warmup, steps, output
        self.start = self.cpu_start = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        device = pl_module.device.type
        if trainer.global_step == self.warmup:
            sync(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()
            self.cpu_start = process_cpu_seconds()
        elif trainer.global_step == self.warmup + self.steps:
            sync(device)
            seconds = time.perf_counter() - self.start
            x0 = batch["x0"]
            peak = (torch.cuda.max_memory_allocated() if device == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            result = {"steps_per_s": self.steps / seconds,
                      "cpu_s_per_step": (process_cpu_seconds() - self.cpu_start) / self.steps,
                      "tokens_per_s": self.steps * x0.numel() * trainer.world_size / seconds,
                      "peak_memory_gib": peak / 2**30, "loss": float(outputs["loss"])}
            Path(self.output).write_text(json.dumps(result))
            trainer.should_stop = True


def token_file(size: Size, folder: Path) -> Path:
    """A random token stream, enough for the run's batches plus the held-out splits."""
    path = folder / f"tokens_{size.vocab_size}.npy"
    n = (size.warmup + size.steps + 4) * size.batch * size.seq_len + 2 * size.seq_len
    if not path.exists() or len(np.load(path, mmap_mode="r")) < n:
        rng = np.random.default_rng(0)
        np.save(path, rng.integers(0, size.vocab_size, n, dtype=np.uint16 if size.vocab_size < 65536 else np.int32))
    return path


def fit_args(size: Size, method: str, levers: dict[str, Any], tokens: Path, run_dir: Path, result: Path) -> list[str]:
    """The ``md4 fit`` command line of one row."""
    net = {"n_layers": size.n_layers, "d_model": size.d_model, "n_heads": size.n_heads, "dropout": 0.02,
           "time_conditioning": method == "GenMD4"}
    model_args: dict[str, Any] = {"network": net, "optim": {"lr": 3e-4, "warmup_steps": 2000, "weight_decay": 0.03}}
    if method == "MD4":
        model_args["logits_at"] = levers.get("logits_at", "all")
        model_args["ce_chunk_rows"] = size.ce_chunk_rows if levers.get("ce_chunked") else None
    callbacks = [
        {"class_path": levers.get("ema", "lightning.pytorch.callbacks.EMAWeightAveraging"),
         "init_args": {"decay": 0.9999}},
        {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar",
         "init_args": {"refresh_rate": levers.get("bar_refresh", 1)}},
        {"class_path": "benchmarks.speed.StepTimer",
         "init_args": {"warmup": size.warmup, "steps": size.steps, "output": str(result)}},
    ]
    if levers.get("compile"):
        callbacks.append({"class_path": "lightning_md4.speed_callbacks.CompileNetwork"})
    config = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(run_dir), "max_steps": size.warmup + size.steps + 1, "precision": None,
            "devices": 1, "gradient_clip_val": 1.0, "limit_val_batches": 0, "enable_checkpointing": False,
            "log_every_n_steps": 50, "callbacks": callbacks,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(run_dir), "name": "tensorboard"}},
        },
        "model": {"class_path": f"lightning_md4.modules.{method}", "init_args": model_args},
        "data": {"class_path": "datamodules.tokens.TokenFileDataModule",
                 "init_args": {"path": str(tokens), "vocab_size": size.vocab_size, "seq_len": size.seq_len,
                               "val_tokens": size.seq_len, "test_tokens": size.seq_len,
                               "batch_size": size.batch,
                               "num_workers": 2 if torch.cuda.is_available() else 0}},
    }
    config_path = run_dir / "config.json"
    config_path.write_text(json.dumps(config, indent=1))
    return ["fit", "--config", str(config_path)]


def train_row(size: Size, method: str, levers: dict[str, Any], work: Path, label: str) -> dict[str, Any]:
    run_dir = work / label.replace(" ", "_").replace(".", "")
    run_dir.mkdir(parents=True, exist_ok=True)
    result = run_dir / "result.json"
    result.unlink(missing_ok=True)
    args = fit_args(size, method, levers, token_file(size, work), run_dir, result)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "lightning_md4.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not result.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(result.read_text())


def sample_row(size: Size, device: str, cache: bool, compiled: bool) -> dict[str, Any]:
    """Time MD4's sampler on an untrained network (the cost does not depend on the weights)."""
    from lightning_md4.diffusion.masked import MaskedDiffusion
    from lightning_md4.nets.transformer import Transformer, TransformerConfig
    from lightning_md4.diffusion.schedules import Cosine

    torch.manual_seed(0)
    cfg = TransformerConfig(n_layers=size.n_layers, d_model=size.d_model, n_heads=size.n_heads,
                            time_conditioning=False)
    net = Transformer(size.vocab_size, cfg).to(device).eval()
    if compiled:
        net.compile(dynamic=False)
    process = MaskedDiffusion(Cosine(), size.vocab_size)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = (size.sample_batch, size.seq_len)

    def draw(steps: int) -> int:
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            return process.sample(net, shape, steps, generator=gen, device=device, cache=cache, return_nfe=True)[1]

    draw(8)  # warm-up (and compilation)
    sync(device)
    start = time.perf_counter()
    nfe = draw(size.sample_steps)
    sync(device)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": size.sample_batch * size.seq_len / seconds, "seconds": seconds, "nfe": nfe}


def markdown(rows: list[dict[str, Any]], peak: float, size: Size) -> str:
    lines = [f"matmul peak {peak / 1e12:.2f} TFLOP/s; {flops_per_token(size) / 1e6:.1f} MFLOP per token",
             "", "| method | levers | steps/s | tokens/s | MFU | peak memory GiB | vs first row | CPU s/step |",
             "|---|---|---|---|---|---|---|---|"]
    first = next((r["tokens_per_s"] for r in rows if "tokens_per_s" in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['label']} | failed: {r['error'].splitlines()[-1][:120]} | | | | | |")
            continue
        mfu = r["tokens_per_s"] * flops_per_token(size) / peak
        lines.append(f"| {r['method']} | {r['label']} | {r['steps_per_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{100 * mfu:.1f}% | {r['peak_memory_gib']:.2f} | {r['tokens_per_s'] / first:.2f}x | "
                     f"{r.get('cpu_s_per_step', float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--methods", default="MD4", help="comma list of methods, or 'all'")
    p.add_argument("--levers", type=int, default=len(LEVERS), help="use the first N levers")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the whole chain this many times and keep each row's fastest run (a busy CPU)")
    p.add_argument("--no-sampling", action="store_true")
    p.add_argument("--work", default="/tmp/md4_speed", help="scratch folder for token files and runs")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    size = SIZES[args.size]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    methods = METHODS if args.methods == "all" else tuple(args.methods.split(","))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    peak = matmul_peak(device)
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu'}: "
          f"matmul peak {peak / 1e12:.3f} TFLOP/s", flush=True)
    chain: list[tuple[str, str, dict[str, Any]]] = []  # (method, label, levers)
    levers: dict[str, Any] = {}
    for name, change in LEVERS[: args.levers]:
        levers = {**levers, **change}
        chain.append(("MD4", name, levers))
    for method in methods:
        if method != "MD4":
            chain.append((method, "all levers that apply",
                          {k: v for k, v in levers.items() if k not in ("logits_at", "ce_chunked")}))
    rows: list[dict[str, Any]] = [{} for _ in chain]
    for _ in range(args.repeats):
        for i, (method, label, row_levers) in enumerate(chain):
            row = {"method": method, "label": label,
                   **train_row(size, method, row_levers, work, f"{method}_{label}")}
            print(row, flush=True)
            best = rows[i]
            if "error" in row:
                rows[i] = best or row  # an error only where no run succeeded
            elif "tokens_per_s" not in best or row["tokens_per_s"] > best["tokens_per_s"]:
                rows[i] = row
    table = markdown(rows, peak, size)

    samples: list[dict[str, Any]] = []
    if not args.no_sampling:
        for cache, compiled in ((False, False), (True, False), (True, True)):
            runs = [sample_row(size, device, cache, compiled) for _ in range(args.repeats)]
            row = {"cache": cache, "compile": compiled, **min(runs, key=lambda r: r["seconds"])}
            samples.append(row)
            print(row, flush=True)
        table += ("\n\n" f"Sampling: batch {size.sample_batch} x {size.seq_len} tokens, {size.sample_steps} steps, "
                  "cosine schedule, untrained time-independent network\n\n"
                  "| output cache | compile | seconds | tokens/s | network evaluations |\n|---|---|---|---|---|\n")
        table += "\n".join(f"| {r['cache']} | {r['compile']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | "
                           f"{r['nfe']} |" for r in samples)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"speed_{args.size}_{device}_{dt.date.today().isoformat()}"
    meta = {"size": asdict(size), "device": device, "peak_flops": peak, "flops_per_token": flops_per_token(size),
            "torch": torch.__version__, "command": " ".join(sys.argv)}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "train": rows, "sample": samples}, indent=1))
    stem.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
