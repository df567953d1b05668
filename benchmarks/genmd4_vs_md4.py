"""MD4 vs GenMD4 (both estimators) at a matched budget, through the real `md4` CLI.

For each data set it trains, with the same network (time-conditioned), optimiser, batch and seed:
  - MD4, linear schedule, S steps (1 network pass per step);
  - GenMD4 with the batch leave-one-out estimator, S steps (1 pass per step: MD4's compute);
  - GenMD4 with the paper's two-sample RLOO estimator, S/2 steps (2 passes per step: same compute)
    and S steps (twice the compute);
then reports the test NELBO (bits per token, EMA weights, ``replicas x draws`` keyed evaluation
draws per sequence with the estimate's measured se: ``benchmarks.scoring``) and GenMD4's learned exponents for the most and least frequent tokens.

    python -m benchmarks.genmd4_vs_md4 --steps 600 --corpus ../shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

from benchmarks.cli_runs import ROOT, learned_exponents, train
from lightning_md4.tables import markdown_table
from benchmarks.scoring import cached_score
from datamodules import CharDataModule, DigitsDataModule

NET = ["--model.init_args.network.time_conditioning=true"]


def token_frequencies(dm) -> tuple[torch.Tensor, list[str] | None]:
    """Training-set token frequencies (first 2000 examples) and token names."""
    dm.setup("fit")
    counts = torch.zeros(dm.vocab_size)
    for i in range(min(len(dm.train_set), 2000)):
        counts += torch.bincount(dm.train_set[i]["x0"], minlength=dm.vocab_size)
    names = dm.decode(torch.arange(dm.vocab_size)[None])
    return counts / counts.sum(), (list(names[0]) if names else None)


def exponents(w: dict[str, float] | None) -> str:
    """GenMD4's exponents of a few tokens as ``token: w, ...``; ``-`` for a model without them."""
    return ", ".join(f"{token}: {value:.3f}" for token, value in w.items()) if w else "-"


def results_table(results: list[dict]) -> pd.DataFrame:
    """One line per run: its budget, test NELBO and the exponents of the most and least frequent tokens."""
    return pd.DataFrame({
        "data": [r["data"] for r in results], "run": [r["run"] for r in results],
        "steps": [r["steps"] for r in results], "network passes": [r["passes"] for r in results],
        "fit s": [r["fit_s"] for r in results],
        "test NELBO (bits/token) +- evaluation se": [f"{r['test_bpt']:.4f} +- {r['eval_se']:.4f}" for r in results],
        "w of most frequent": [exponents(r.get("w_most_frequent")) for r in results],
        "w of least frequent": [exponents(r.get("w_least_frequent")) for r in results],
    })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_genmd4"))
    p.add_argument("--datasets", nargs="+", default=["digits", "chars"])
    p.add_argument("--replicas", type=int, default=4, help="evaluation replicas (eval seeds) per checkpoint")
    p.add_argument("--draws", type=int, default=8, help="time draws per sequence in each replica")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = {
        "digits": [f"--config={ROOT / 'configs' / 'digits.yaml'}", *NET],
        "chars": [f"--config={ROOT / 'configs' / 'tiny_text.yaml'}", f"--data.init_args.path={args.corpus}", *NET],
    }
    genmd4 = ["--model=lightning_md4.modules.GenMD4", *NET]
    results = []
    for data in args.datasets:
        base = datasets[data]
        s = args.steps
        runs = [("md4_linear", ["--model.init_args.schedule=linear"], s),
                ("genmd4_batch", [*genmd4, "--model.init_args.estimator=batch"], s),
                ("genmd4_rloo_same_compute", [*genmd4, "--model.init_args.estimator=rloo"], s // 2),
                ("genmd4_rloo", [*genmd4, "--model.init_args.estimator=rloo"], s)]
        dm = DigitsDataModule() if data == "digits" else CharDataModule(args.corpus, seq_len=128)
        freq, names = token_frequencies(dm)
        for name, overlay, steps in runs:
            ckpt, fit_s = train(out / data / name, [*base, *overlay], steps)
            test = cached_score(ckpt, args.replicas, args.draws)
            r = {"run": name, "data": data, "steps": steps, "passes": steps * (2 if "rloo" in name else 1),
                 "fit_s": fit_s, "test_bpt": test.bpt, "eval_se": test.se, "w": learned_exponents(ckpt)}
            if r["w"] is not None:
                order = torch.argsort(freq, descending=True).tolist()
                label = (lambda i: repr(names[i]) if names else str(i))
                r["w_most_frequent"] = {label(i): round(r["w"][i], 3) for i in order[:3]}
                r["w_least_frequent"] = {label(i): round(r["w"][i], 3) for i in order[-3:] if freq[i] > 0}
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "w"}), flush=True)
    table = markdown_table(results_table(results))
    print(table)
    dest = ROOT / "benchmarks" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "genmd4_vs_md4.md").write_text(table + "\n")
    (dest / "genmd4_vs_md4.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
