"""A small version of the paper's text8 comparison: MD4, GenMD4, SEDD and D3PM on one footing.

Every method trains the same tiny transformer (configs/tiny_text.yaml's network, time-conditioned
so that GenMD4 and SEDD get what they need), with the same steps, batch, optimiser and seeds, on a
text8-style character corpus (lower-case letters and spaces; any local text file is converted).
It prints and saves one table: test BPC (EMA weights, keyed evaluation noise) as mean and spread
over seeds. Training speed per method is benchmarks/speed.py's (``--methods all``).

    python -m benchmarks.compare_methods --steps 400 --seeds 0 1 2

Paper (text8, 1M steps, 12 x 768): MD4 1.37 < SEDD 1.39 < D3PM 1.45 BPC, GenMD4 1.34.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import pandas as pd

from benchmarks.cli_runs import ROOT, markdown_table, train_and_test

METHODS = ("MD4", "GenMD4", "SEDD", "D3PM")
NET = {"n_layers": 2, "d_model": 128, "n_heads": 4, "d_cond": 64, "time_conditioning": True}


def text8_style(source: Path, dest: Path) -> Path:
    """Lower-case the text, turn every non-letter run into one space: text8's 27-symbol alphabet."""
    text = re.sub(r"[^a-z]+", " ", source.read_text(encoding="utf-8").lower()).strip()
    dest.write_text(text, encoding="utf-8")
    return dest


def bpc_table(rows: list[dict]) -> pd.DataFrame:
    """Test BPC of each method: mean +- sd over seeds, and each seed's."""
    return pd.DataFrame({
        "method": [r["method"] for r in rows],
        "test BPC (mean +- sd over seeds)": [f"{r['bpc_mean']:.4f} +- {r['bpc_sd']:.4f}" for r in rows],
        "per seed": [", ".join(f"{b:.4f}" for b in r["bpc"]) for r in rows],
    })


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_compare"), help="folder for the runs")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "compare_methods"),
                   help="where the table goes: RESULTS.md and RESULTS.json")
    args = p.parse_args(argv)
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
        rows.append({"method": method, "bpc_mean": statistics.mean(bpcs),
                     "bpc_sd": statistics.stdev(bpcs) if len(bpcs) > 1 else 0.0, "bpc": bpcs})
    table = (f"{args.steps} steps, batch 32 x 128 characters, seeds {args.seeds}, corpus {Path(args.corpus).name} "
             "(text8 alphabet)\n\n" + markdown_table(bpc_table(rows)) + "\n")
    print(table)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".md").write_text(table)
    # json, not pandas' to_json: that rounds to at most 15 digits, and these numbers are compared exactly.
    results.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
