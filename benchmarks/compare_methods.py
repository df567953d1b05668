"""A small version of the paper's text8 comparison: MD4, GenMD4, SEDD and D3PM on one footing.

Every method trains the same tiny transformer (configs/tiny_text.yaml's network, time-conditioned
so that GenMD4 and SEDD get what they need), with the same steps, batch, optimiser and seeds, on a
text8-style character corpus (lower-case letters and spaces; any local text file is converted).
It prints and saves one table: test BPC (EMA weights, keyed evaluation noise) as mean and spread
over seeds, and training steps per second of each method measured side by side in this process.

    python -m benchmarks.compare_methods --steps 400 --seeds 0 1 2

Paper (text8, 1M steps, 12 x 768): MD4 1.37 < SEDD 1.39 < D3PM 1.45 BPC, GenMD4 1.34.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch

from benchmarks.cli_runs import ROOT, train_and_test
from lightning_md4.modules import D3PM, SEDD, GenMD4, MD4
from lightning_md4.nets import TransformerConfig

METHODS = {"MD4": MD4, "GenMD4": GenMD4, "SEDD": SEDD, "D3PM": D3PM}
NET = {"n_layers": 2, "d_model": 128, "n_heads": 4, "d_cond": 64, "time_conditioning": True}


def text8_style(source: Path, dest: Path) -> Path:
    """Lower-case the text, turn every non-letter run into one space: text8's 27-symbol alphabet."""
    text = re.sub(r"[^a-z]+", " ", source.read_text(encoding="utf-8").lower()).strip()
    dest.write_text(text, encoding="utf-8")
    return dest


class _Trainer:
    world_size, global_rank, global_step, accumulate_grad_batches = 1, 0, 0, 1


def steps_per_second(method: str, vocab: int, seq_len: int, batch: int, repeats: int = 20) -> float:
    """Training steps per second (objective, backward, AdamW step) of one method, float32 on this CPU."""
    torch.manual_seed(0)
    module = METHODS[method](vocab, seq_len, network=TransformerConfig(**NET))
    module._trainer = _Trainer()  # what the training noise reads of a Trainer
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    data = {"x0": torch.randint(0, vocab, (batch, seq_len)), "index": torch.arange(batch)}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        objective, _ = module.train_objective(data)
        objective.mean().backward()
        opt.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return repeats / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_compare"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = text8_style(Path(args.corpus), out / "corpus_text8_style.txt")
    base = [f"--config={ROOT / 'configs' / 'tiny_text.yaml'}", f"--data.init_args.path={corpus}",
            "--data.init_args.seq_len=128", "--data.init_args.batch_size=32",
            *[f"--model.init_args.network.{k}={v}" for k, v in NET.items()]]
    rows = []
    for method in args.methods:
        bpcs = []
        for seed in args.seeds:
            r = train_and_test(out / method / f"seed{seed}", [*base, f"--model={method}", f"--seed_everything={seed}",
                                                              f"--model.init_args.seed={seed}"], args.steps)
            bpcs.append(r["test_bpt"])
            print(json.dumps({"method": method, "seed": seed, **{k: v for k, v in r.items() if k != "w"}}), flush=True)
        rate = steps_per_second(method, 27, 128, 32)
        rows.append({"method": method, "bpc_mean": statistics.mean(bpcs),
                     "bpc_sd": statistics.stdev(bpcs) if len(bpcs) > 1 else 0.0, "bpc": bpcs, "steps_per_s": rate})
    md4_rate = next((r["steps_per_s"] for r in rows if r["method"] == "MD4"), None)
    lines = [f"{args.steps} steps, batch 32 x 128 characters, seeds {args.seeds}, corpus {Path(args.corpus).name} "
             "(text8 alphabet)", "",
             "| method | test BPC (mean +- sd over seeds) | per seed | train steps/s | vs MD4 |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['steps_per_s'] / md4_rate:.2f}x" if md4_rate else "-"
        lines.append(f"| {r['method']} | {r['bpc_mean']:.4f} +- {r['bpc_sd']:.4f} | "
                     f"{', '.join(f'{b:.4f}' for b in r['bpc'])} | {r['steps_per_s']:.2f} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    dest = ROOT / "benchmarks" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "compare_methods.md").write_text(table + "\n")
    (dest / "compare_methods.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
