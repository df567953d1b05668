"""A small version of the paper's text8 comparison: every method on one footing, scored so the
decimals mean something.

Every row trains the same tiny transformer (configs/tiny_text.yaml's network, time-conditioned so
that GenMD4 and SEDD get what they need) with the same steps, batch, optimiser, seeds and no
gradient clipping (the paper configs clip nothing), on a text8-style character corpus (lower-case
letters and spaces; any local text file is converted), each method at its paper's settings (see
``ROWS``). The test split is scored with ``replicas x draws`` evaluation draws per sequence
(``benchmarks.scoring``), D3PM also with its exact T-term sum on the first ``--exact-examples``
sequences, beside the draw estimate on the same sequences. The table
gives mean +- se over seeds, the evaluation estimate's own se, and each row's paired difference
against MD4 by seed with a 95% t interval and a verdict, computed by the sweep report's code.

    python -m benchmarks.compare_methods --steps 500 --seeds 0 1 2

A run folder whose fit finished, and its score at the same replicas x draws, are reused: a rerun
with another row or seed trains only what is new (delete ``--out`` to start over).

Paper (text8, 1M steps, 12 x 768): GenMD4 1.34 < MD4 1.37 < SEDD 1.39 < D3PM 1.45 BPC.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from benchmarks.cli_runs import ROOT, train
from benchmarks.scoring import cached_score, compare
from lightning_md4.tables import markdown_table

NET = {"n_layers": 2, "d_model": 128, "n_heads": 4, "d_cond": 64, "time_conditioning": True}


@dataclass(frozen=True)
class Row:
    """A method at its paper's settings: the ``md4 fit`` options that select it and what they mean."""

    name: str
    args: tuple[str, ...]
    settings: str
    passes: int = 1  # network passes per training step
    noise_seeded: bool = True  # takes model.init_args.seed (the training noise); AR has no noise

    @property
    def method(self) -> str:
        """The registered method the row trains (its ``--model``)."""
        return next(arg.split("=", 1)[1] for arg in self.args if arg.startswith("--model="))


ROWS = (
    Row("MD4", ("--model=MD4", "--model.init_args.schedule=linear", "--model.init_args.schedule_kwargs={clip_eps: 1.0e-4}"),
        "linear, clip_eps 1e-4 (paper config)"),
    Row("MD4 + flat CE x10", ("--model=MD4", "--model.init_args.schedule=linear",
                              "--model.init_args.schedule_kwargs={clip_eps: 1.0e-4}", "--model.init_args.ce_weight=10"),
        "as MD4, trained on nelbo + 10 CE (D3PM's lambda T); reported: the bound"),
    Row("GenMD4 (rloo)", ("--model=GenMD4", "--model.init_args.estimator=rloo"),
        "w_init 1, eps 1e-4, t_min 1e-3, RLOO over 2 samples (paper)", passes=2),
    Row("GenMD4 (batch)", ("--model=GenMD4", "--model.init_args.estimator=batch"),
        "as rloo, leave-one-out over the batch (MD4's compute)"),
    Row("SEDD", ("--model=SEDD", "--model.init_args.state_space=absorbing", "--model.init_args.schedule=loglinear"),
        "absorbing, log-linear, eps 1e-3 (SEDD's)"),
    Row("D3PM", ("--model=D3PM", "--model.init_args.state_space=absorbing", "--model.init_args.T=1000",
                 "--model.init_args.hybrid_lambda=0.01"),
        "absorbing, T 1000, hybrid lambda 0.01 (Austin et al.'s text)"),
    Row("MDLM", ("--model=MDLM", "--model.init_args.schedule=loglinear", "--model.init_args.schedule_kwargs={eps: 1.0e-3}"),
        "SUBS, log-linear, eps 1e-3 (MDLM's)"),
    Row("AR", ("--model=AR",), "causal transformer, same blocks and width, no time input; exact NLL",
        noise_seeded=False),
)


def text8_style(source: Path, dest: Path) -> Path:
    """Lower-case the text, turn every non-letter run into one space: text8's 27-symbol alphabet."""
    text = re.sub(r"[^a-z]+", " ", source.read_text(encoding="utf-8").lower()).strip()
    dest.write_text(text, encoding="utf-8")
    return dest


def compare_table(results: pd.DataFrame, rows: dict[str, Row]) -> pd.DataFrame:
    """The table, one line per method of ``results`` (``method``, ``seed``, ``bpt``, ``se``,
    ``exact_bpt``; the first method is the baseline): settings, passes per step, BPC mean +- se over
    seeds, the evaluation estimate's se, per-seed values, D3PM's exact sum, and the paired
    difference against the baseline with its interval and verdict."""
    baseline = results["method"].iloc[0]
    table = compare(results, baseline)

    def cell(r: pd.Series) -> str:
        return "-" if pd.isna(r["difference"]) else f"{r['difference']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]"

    per_seed = results.groupby("method", sort=False)["bpt"].apply(lambda v: ", ".join(f"{b:.4f}" for b in v))
    eval_se = results.groupby("method", sort=False)["se"].max()

    def exact_cell(runs: pd.DataFrame) -> str:
        if runs["exact_bpt"].isna().all():
            return "-"
        return (f"{runs['exact_bpt'].mean():.4f} vs drawn {runs['drawn_bpt'].mean():.4f} "
                f"(first {runs['exact_sequences'].iloc[0]} sequences, mean over seeds)")

    exact = {m: exact_cell(runs) for m, runs in results.groupby("method", sort=False)}
    return pd.DataFrame({
        "method": table["method"],
        "settings": [rows[m].settings for m in table["method"]],
        "passes/step": [rows[m].passes for m in table["method"]],
        "test BPC, mean +- se over seeds": [f"{m:.4f} +- {s:.4f}" for m, s in zip(table["mean"], table["se"])],
        "evaluation se (largest seed)": [f"{eval_se[m]:.4f}" for m in table["method"]],
        "per seed": [per_seed[m] for m in table["method"]],
        "exact T-sum BPC vs the draws on the same sequences": [exact[m] for m in table["method"]],
        f"paired diff vs {baseline} [95% t interval]": [cell(r) for _, r in table.iterrows()],
        "verdict": [r["verdict"] if isinstance(r["verdict"], str) else "baseline" for _, r in table.iterrows()],
    })


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=[r.name for r in ROWS], help="row names of ROWS")
    p.add_argument("--replicas", type=int, default=4, help="evaluation replicas (eval seeds) per checkpoint")
    p.add_argument("--draws", type=int, default=8, help="time draws per sequence in each replica")
    p.add_argument("--exact-examples", type=int, default=128,
                   help="test sequences for D3PM's exact T-term sum (T network passes each)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_compare"), help="folder for the runs")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "compare_methods"),
                   help="where the table goes: RESULTS.md and RESULTS.json")
    args = p.parse_args(argv)
    rows = {r.name: r for r in ROWS}
    unknown = [m for m in args.methods if m not in rows]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(rows)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = text8_style(Path(args.corpus), out / "corpus_text8_style.txt")
    base = [f"--config={ROOT / 'configs' / 'tiny_text.yaml'}", f"--data.init_args.path={corpus}",
            "--data.init_args.seq_len=128", "--data.init_args.batch_size=32", "--trainer.gradient_clip_val=null",
            *[f"--model.init_args.network.{k}={v}" for k, v in NET.items()]]
    records = []
    for name in args.methods:
        for seed in args.seeds:
            folder = out / re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") / f"seed{seed}"
            seeds = [f"--seed_everything={seed}", *([f"--model.init_args.seed={seed}"] * rows[name].noise_seeded)]
            ckpt, _ = train(folder, [*base, *rows[name].args, *seeds], args.steps)
            s = cached_score(ckpt, args.replicas, args.draws, args.exact_examples)
            record = {"method": name, "seed": seed, **asdict(s)}
            records.append(record)
            print(json.dumps(record), flush=True)
    results = pd.DataFrame(records)
    text = (f"{args.steps} steps, batch 32 x 128 characters, seeds {args.seeds}, corpus {Path(args.corpus).name} "
            f"(text8 alphabet), no gradient clipping; test split scored with {args.replicas} x {args.draws} "
            "draws per sequence (EMA weights)\n\n" + markdown_table(compare_table(results, rows)) + "\n")
    print(text)
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".md").write_text(text)
    # json, not pandas' to_json: that rounds to at most 15 digits, and these numbers are compared exactly.
    path.with_suffix(".json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
