"""MD4 vs GenMD4 (both estimators) at a matched budget, through the real `md4` CLI.

For each data set it trains, with the same network (time-conditioned), optimiser, batch and seed:
  - MD4, linear schedule, S steps (1 network pass per step);
  - GenMD4 with the batch leave-one-out estimator, S steps (1 pass per step: MD4's compute);
  - GenMD4 with the paper's two-sample RLOO estimator, S/2 steps (2 passes per step: same compute)
    and S steps (twice the compute);
then reports the test NELBO (bits per token, EMA weights, keyed evaluation noise so runs are
compared on identical draws) and GenMD4's learned exponents for the most and least frequent tokens.

    python benchmarks/genmd4_vs_md4.py --steps 600 --corpus ../shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from datamodules import CharDataModule, DigitsDataModule

ROOT = Path(__file__).resolve().parents[1]
NET = ["--model.init_args.network.time_conditioning=true"]


def run(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "lightning_md4.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"md4 {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def train_and_test(name: str, base: list[str], overlay: list[str], steps: int, out: Path) -> dict:
    root = out / name
    common = [*base, *overlay, f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false"]
    start = time.perf_counter()
    run(["fit", *common, f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}",
         "--trainer.limit_val_batches=2"])
    seconds = time.perf_counter() - start
    text = run(["test", *common, f"--ckpt_path={root / 'checkpoints' / 'last.ckpt'}"])
    nats = float(re.search(r"test: NELBO ([0-9.]+) nats/token", text).group(1))
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    raw = ckpt["state_dict"].get("schedule.raw")
    return {"run": name, "steps": steps, "train_s": round(seconds, 1), "test_nats": nats,
            "test_bpt": nats / 0.6931471805599453, "w": F.softplus(raw).tolist() if raw is not None else None}


def token_frequencies(dm) -> tuple[torch.Tensor, list[str] | None]:
    """Training-set token frequencies (first 2000 examples) and token names."""
    dm.setup("fit")
    counts = torch.zeros(dm.vocab_size)
    for i in range(min(len(dm.train_set), 2000)):
        counts += torch.bincount(dm.train_set[i]["x0"], minlength=dm.vocab_size)
    names = dm.decode(torch.arange(dm.vocab_size)[None])
    return counts / counts.sum(), (list(names[0]) if names else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_genmd4"))
    p.add_argument("--datasets", nargs="+", default=["digits", "chars"])
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
            r = train_and_test(f"{data}/{name}", base, overlay, steps, out)
            r.update(data=data, passes=steps * (2 if "rloo" in name else 1))
            if r["w"] is not None:
                order = torch.argsort(freq, descending=True).tolist()
                label = (lambda i: repr(names[i]) if names else str(i))
                r["w_most_frequent"] = {label(i): round(r["w"][i], 3) for i in order[:3]}
                r["w_least_frequent"] = {label(i): round(r["w"][i], 3) for i in order[-3:] if freq[i] > 0}
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "w"}), flush=True)
    lines = ["| data | run | steps | network passes | train s | test NELBO (bits/token) | w of most frequent | w of least frequent |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['data']} | {r['run'].split('/')[-1]} | {r['steps']} | {r['passes']} | {r['train_s']} | "
                     f"{r['test_bpt']:.4f} | {r.get('w_most_frequent', '-')} | {r.get('w_least_frequent', '-')} |")
    table = "\n".join(lines)
    print(table)
    dest = ROOT / "benchmarks" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "genmd4_vs_md4.md").write_text(table + "\n")
    (dest / "genmd4_vs_md4.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
