"""CPU benchmark of MD4: training throughput, peak memory and cached vs uncached sampling.

Two sizes: ``tiny`` (the network of ``configs/digits.yaml``) and ``paper`` (the paper's text8
model, 12 layers x 768 x 12 heads). Each size runs in its own subprocess so that its peak RSS
(``ru_maxrss``) is not contaminated by the other. The parent collects the children's JSON, prints
one table and writes ``cpu_<date>.json`` and ``cpu_<date>.md`` under ``--out``.

Usage::

    .venv/bin/python benchmarks/cpu_bench.py            # full run, a few minutes on 2 cores
    .venv/bin/python benchmarks/cpu_bench.py --quick    # smoke test, well under a minute

CPU numbers are only relative: compare rows and cache on/off, not against GPU figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_md4.diffusion.masked import MaskedDiffusion
from lightning_md4.nets.transformer import Transformer, TransformerConfig
from lightning_md4.diffusion.schedules import Cosine, Linear, Schedule

SIZES = ("tiny", "paper")
SEED = 0


@dataclass
class SizeSpec:
    """One benchmarked model size and how long to time it."""

    name: str
    vocab_size: int
    seq_len: int
    batch: int
    net: TransformerConfig
    schedule: str  # "cosine" or "linear", as in the size's config file
    lr: float
    warmup_steps: int  # untimed training steps
    timed_steps: int  # timed training steps (median reported)
    sample_steps: int
    sample_repeats: int  # alternating cache-off / cache-on runs (median reported)


def size_spec(name: str, args: argparse.Namespace) -> SizeSpec:
    """The spec of size ``name``; ``--quick`` shrinks every count to a smoke test."""
    q = args.quick
    if name == "tiny":  # configs/digits.yaml
        return SizeSpec(
            name="tiny", vocab_size=17, seq_len=64, batch=64,
            net=TransformerConfig(n_layers=4, d_model=128, n_heads=4, d_cond=64, dropout=0.1,
                                  time_conditioning=False),
            schedule="cosine", lr=1e-3,
            warmup_steps=1 if q else 5, timed_steps=3 if q else 20,
            sample_steps=100 if q else args.tiny_sample_steps, sample_repeats=1 if q else 3,
        )
    if name == "paper":  # configs/text8.yaml
        return SizeSpec(
            name="paper", vocab_size=27, seq_len=256, batch=1 if q else args.paper_batch,
            net=TransformerConfig(n_layers=12, d_model=768, n_heads=12, d_cond=128, dropout=0.05,
                                  time_conditioning=False),
            schedule="linear", lr=3e-4,
            warmup_steps=1 if q else 2, timed_steps=1 if q else 3,
            sample_steps=8 if q else args.paper_sample_steps, sample_repeats=1,
        )
    raise ValueError(f"unknown size {name!r}; choose from {SIZES}")


# -- measurements (run inside the per-size subprocess) ---------------------------------------
def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_average() -> float:
    """The machine's 1-minute load average: above the core count, other processes compete."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def make_schedule(name: str) -> Schedule:
    """The masking schedule of a size's config file."""
    return {"cosine": Cosine, "linear": Linear}[name]()


def train_step(model: Transformer, diffusion: MaskedDiffusion, opt: torch.optim.Optimizer,
               x0: torch.Tensor) -> float:
    """One full training step: NELBO (antithetic t) per token, backward, clip 1.0, AdamW step."""
    loss = diffusion.nelbo(model, x0, antithetic=True).mean() / x0.shape[1]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss)


def bench_train(spec: SizeSpec, model: Transformer, diffusion: MaskedDiffusion) -> dict[str, Any]:
    """Median wall time of ``timed_steps`` training steps after ``warmup_steps``, float32."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.999), weight_decay=0.03)
    x0 = torch.randint(0, spec.vocab_size, (spec.batch, spec.seq_len))
    for _ in range(spec.warmup_steps):
        train_step(model, diffusion, opt, x0)
    times = []
    for _ in range(spec.timed_steps):
        start = time.perf_counter()
        loss = train_step(model, diffusion, opt, x0)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {
        "train_step_s": step_s,
        "train_step_s_all": times,
        "train_steps_per_s": 1.0 / step_s,
        "train_tokens_per_s": spec.batch * spec.seq_len / step_s,
        "last_loss": loss,
    }


def timed_sample(spec: SizeSpec, model: Transformer, diffusion: MaskedDiffusion,
                 cache: bool) -> tuple[float, int, torch.Tensor]:
    """Wall time, NFE and tokens of one batch-1 sample with the output cache forced on or off."""
    gen = torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    tokens, nfe = diffusion.sample(model, (1, spec.seq_len), spec.sample_steps, grid="uniform",
                                   generator=gen, cache=cache, return_nfe=True)
    return time.perf_counter() - start, nfe, tokens


def bench_sample(spec: SizeSpec, model: Transformer, diffusion: MaskedDiffusion) -> dict[str, Any]:
    """Cache off vs on, same seed, batch 1, alternated ``sample_repeats`` times (median times)."""
    model.eval()
    with torch.no_grad():  # one untimed forward so neither variant pays the first-call cost
        model(torch.full((1, spec.seq_len), diffusion.mask_id), torch.ones(1))
    runs: dict[bool, list[float]] = {False: [], True: []}
    nfe: dict[bool, int] = {}
    tokens: dict[bool, torch.Tensor] = {}
    for _ in range(spec.sample_repeats):
        for cache in (False, True):
            seconds, nfe[cache], tokens[cache] = timed_sample(spec, model, diffusion, cache)
            runs[cache].append(seconds)
    off, on = statistics.median(runs[False]), statistics.median(runs[True])
    return {
        "sample_steps": spec.sample_steps,
        "sample_batch": 1,
        "nfe_cache_off": nfe[False],
        "nfe_cache_on": nfe[True],
        "sample_s_cache_off": off,
        "sample_s_cache_on": on,
        "sample_s_all": {"off": runs[False], "on": runs[True]},
        "sample_speedup": off / on,
        "same_tokens": bool(torch.equal(tokens[False], tokens[True])),
    }


def run_size(spec: SizeSpec) -> dict[str, Any]:
    """Every measurement for one size, in this process (call it in a fresh subprocess)."""
    torch.manual_seed(SEED)
    load_start = load_average()
    rss_before = peak_rss_mib()
    model = Transformer(spec.vocab_size, spec.net)
    rss_model = peak_rss_mib()
    diffusion = MaskedDiffusion(make_schedule(spec.schedule), spec.vocab_size)
    result: dict[str, Any] = {
        "size": spec.name,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": spec.batch,
        "seq_len": spec.seq_len,
        "vocab_size": spec.vocab_size,
        "spec": {**asdict(spec), "net": asdict(spec.net)},
        "rss_before_model_mib": rss_before,
        "rss_after_model_mib": rss_model,
    }
    result.update(bench_train(spec, model, diffusion))
    result["peak_rss_train_mib"] = peak_rss_mib()
    result.update(bench_sample(spec, model, diffusion))
    result["peak_rss_mib"] = peak_rss_mib()
    result["load_average_1min"] = {"start": load_start, "end": load_average()}
    return result


# -- orchestration (parent process) ----------------------------------------------------------
def default_threads() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def child_argv(size: str, argv: list[str]) -> list[str]:
    """This script's command line for a subprocess that runs only ``size``."""
    return [sys.executable, str(Path(__file__).resolve()), *argv, "--only", size]


def run_in_subprocess(size: str, argv: list[str]) -> dict[str, Any]:
    """Run one size in a fresh interpreter; its last stdout line is the result JSON."""
    proc = subprocess.run(child_argv(size, argv), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"size {size!r} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


COLUMNS = ("size", "params", "batch x seq", "train steps/s", "tokens/s", "RSS before model MiB",
           "peak RSS MiB", "sample steps", "NFE cache off/on", "sample s off/on", "speed-up")


def table_row(r: dict[str, Any]) -> list[str]:
    """One size's results as the cells of ``COLUMNS``."""
    return [
        r["size"],
        f"{r['params'] / 1e6:.2f}M",
        f"{r['batch']} x {r['seq_len']}",
        f"{r['train_steps_per_s']:.3g}",
        f"{r['train_tokens_per_s']:,.0f}",
        f"{r['rss_before_model_mib']:.0f}",
        f"{r['peak_rss_mib']:.0f}",
        str(r["sample_steps"]),
        f"{r['nfe_cache_off']} / {r['nfe_cache_on']}",
        f"{r['sample_s_cache_off']:.2f} / {r['sample_s_cache_on']:.2f}",
        f"{r['sample_speedup']:.2f}x",
    ]


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The results as a GitHub markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(r)) + " |" for r in results]
    return "\n".join(lines)


def text_table(results: list[dict[str, Any]]) -> str:
    """The results as an aligned plain-text table."""
    rows = [list(COLUMNS)] + [table_row(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]

    def fmt(row: list[str]) -> str:
        return "  ".join(cell.rjust(w) for cell, w in zip(row, widths))

    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]])


def environment(threads: int) -> dict[str, Any]:
    """The machine and software the numbers come from."""
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": default_threads(),
        "threads": threads,
        "load_average_1min_at_start": load_average(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def save(results: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace) -> tuple[Path, Path]:
    """Write ``cpu_<date>[_quick].json`` and ``.md`` under ``args.out``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cpu_{env['date'][:10]}" + ("_quick" if args.quick else "")
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    payload = {"environment": env, "args": vars(args), "results": results}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    header = (f"CPU benchmark, {env['date']}: {env['cpu']}, {env['cores']} cores, "
              f"{env['threads']} threads, torch {env['torch']}, "
              f"1-min load average at start {env['load_average_1min_at_start']:.2f}"
              + (" (--quick: smoke-test counts)" if args.quick else "") + "\n\n")
    md_path.write_text(header + markdown_table(results) + "\n")
    return json_path, md_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--only`` is internal: the per-size subprocess)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    p.add_argument("--paper-batch", type=int, default=4, help="training batch of the paper size")
    p.add_argument("--paper-sample-steps", type=int, default=256, help="sampling steps, paper size")
    p.add_argument("--tiny-sample-steps", type=int, default=1000, help="sampling steps, tiny size")
    p.add_argument("--threads", type=int, default=default_threads(), help="torch.set_num_threads")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown")
    p.add_argument("--quick", action="store_true", help="tiny counts: a smoke test")
    p.add_argument("--only", choices=SIZES, help=argparse.SUPPRESS)  # internal: one size, JSON out
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Parent: run each size in a subprocess, print and save the table. Child: one size, JSON out."""
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    torch.set_num_threads(args.threads)
    if args.only:
        print(json.dumps(run_size(size_spec(args.only, args))))
        return
    env = environment(torch.get_num_threads())
    print(f"torch {env['torch']} | {env['cpu']} | {env['cores']} cores | "
          f"torch.set_num_threads({env['threads']}) -> {torch.get_num_threads()} threads")
    if env["load_average_1min_at_start"] > 1.0:
        print(f"warning: load average {env['load_average_1min_at_start']:.2f} on {env['cores']} cores: "
              "other processes compete for the CPU and will slow these numbers down", flush=True)
    results = []
    for size in args.sizes:
        start = time.perf_counter()
        print(f"[{size}] running in a subprocess ...", flush=True)
        results.append(run_in_subprocess(size, raw))
        r = results[-1]
        load = r["load_average_1min"]
        print(f"[{size}] done in {time.perf_counter() - start:.1f}s (cache on/off tokens identical: "
              f"{r['same_tokens']}; load average {load['start']:.2f} -> {load['end']:.2f})", flush=True)
    json_path, md_path = save(results, env, args)
    print()
    print(text_table(results))
    print(f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
