"""Helpers of the fault-tolerance tests: callbacks that the ``md4 fit`` subprocesses load by class
path (the tests put ``tests/`` on their PYTHONPATH), the tiny digits run, and checkpoint comparisons.

Kept out of ``conftest.py`` so that the subprocesses import only this small file.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_md4.checkpointing import DurableCheckpointIO

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits.yaml")
# A 1-layer network of width 32 (tests/test_cli.py's TINY_NET).
TINY_NET = ["--model.init_args.network.n_layers=1", "--model.init_args.network.d_model=32",
            "--model.init_args.network.n_heads=2", "--model.init_args.network.d_cond=16"]


class LossLog(pl.Callback):
    """Appends ``step loss examples`` (the global step after the batch, the loss to 10 significant
    digits, the batch's example indices) after every training batch to ``path`` (``{rank}`` in it
    is replaced by the global rank)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(self.path.format(rank=trainer.global_rank), "a") as f:
            index = batch["index"] if isinstance(batch, dict) and "index" in batch else None
            examples = "" if index is None else " " + ",".join(map(str, index.tolist()))
            f.write(f"{trainer.global_step} {float(loss):.10e}{examples}\n")
            f.flush()


class SigtermAt(pl.Callback):
    """Sends SIGTERM to this process when training step ``step`` starts (global rank ``rank`` only),
    as a preemption would: md4's PreemptionCheckpoint saves ``last.ckpt`` at the end of that batch
    (global step ``step + 1``) and exits with code 143. Only in the first attempt of a run: a run
    resumed from a checkpoint (global step already past ``step`` or a marker file present) goes on."""

    def __init__(self, step: int, rank: int = 0, marker: str | None = None) -> None:
        self.step, self.rank, self.marker = step, rank, marker

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step != self.step or trainer.global_rank != self.rank:
            return
        if self.marker is not None:
            if os.path.exists(self.marker):
                return
            Path(self.marker).write_text(f"{self.step}\n")
        os.kill(os.getpid(), signal.SIGTERM)


class ValLog(pl.Callback):
    """Appends ``step val/nelbo`` after every validation (not the sanity check) to ``path``, on global rank 0."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {float(trainer.callback_metrics['val/nelbo']):.10e}\n")


class SaveLog(DurableCheckpointIO):
    """md4's checkpoint writer, appending ``pid global_step path`` to ``path`` for every file it writes:
    how a test sees which process wrote which checkpoint, and how often."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()} {checkpoint.get('global_step')} {path}\n")


def read_losses(path: Path) -> dict[int, float]:
    """``{step: loss}`` of a LossLog file; a step logged twice (a resumed run repeating it) must agree."""
    losses: dict[int, float] = {}
    for line in path.read_text().splitlines():
        step, loss = line.split()[:2]
        losses.setdefault(int(step), float(loss))
    return losses


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The model weights and EMA weights of a checkpoint, keyed ``model/NAME`` and ``ema/NAME``."""
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    ema = ckpt["state_dict"]
    model = ckpt.get("current_model_state", ema)
    return {**{f"model/{k}": v for k, v in model.items()}, **{f"ema/{k}": v for k, v in ema.items()}}


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def callbacks_config(path: Path, loss_log: Path, *extra: str, val_log: Path | None = None,
                     save_log: Path | None = None) -> Path:
    """A config that replaces digits.yaml's callbacks by its checkpoints, its EMA and a LossLog
    (no sample grids, which would dominate a tiny run's time), plus ``extra`` callbacks (YAML list
    items, e.g. ``"{class_path: faults.SigtermAt, init_args: {step: 5}}"``), a ValLog into
    ``val_log`` and a SaveLog checkpoint writer into ``save_log``."""
    items = ['{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: '
             '"${trainer.default_root_dir}/checkpoints", save_last: true, monitor: val/nelbo, filename: "best-{step}"}}',
             '{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: '
             '"${trainer.default_root_dir}/checkpoints", save_top_k: 2, monitor: step, mode: max}}',
             "{class_path: lightning_md4.speed_callbacks.ForeachEMA, init_args: {decay: 0.995, warmup: true}}",
             f"{{class_path: faults.LossLog, init_args: {{path: '{loss_log}'}}}}", *extra]
    if val_log is not None:
        items.append(f"{{class_path: faults.ValLog, init_args: {{path: '{val_log}'}}}}")
    text = "trainer:\n  callbacks:\n" + "".join(f"    - {item}\n" for item in items)
    if save_log is not None:
        text += f"  plugins:\n    - {{class_path: faults.SaveLog, init_args: {{path: '{save_log}'}}}}\n"
    path.write_text(text)
    return path


def digits_fit(run: Path, steps: int, config: Path, *extra: str) -> list[str]:
    """``md4 fit`` arguments of a tiny digits run into ``run``: the 1-layer network, batches of 64
    (22 an epoch), validation on 32 examples every 10 steps (each saving checkpoints)."""
    return ["fit", "--config", DIGITS, "--config", str(config), f"--trainer.default_root_dir={run}",
            f"--trainer.max_steps={steps}", "--trainer.val_check_interval=10", "--data.init_args.val_examples=32",
            "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", *TINY_NET, *extra]


def env(**more: str) -> dict[str, str]:
    """The environment of a test's subprocesses: one thread, ``tests/`` importable (these callbacks)."""
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **more}


class Pause(pl.Callback):
    """Sleeps ``seconds`` after every training batch from global step ``after`` on: a slower run, so
    that a test's kill lands where it means to (it changes no number)."""

    def __init__(self, after: int, seconds: float) -> None:
        self.after, self.seconds = after, seconds

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.after:
            time.sleep(self.seconds)


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, their children, ...), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (torchrun starts its workers in sessions of their own)."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float) -> bool:
    """Whether something listens on 127.0.0.1:``port`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


# A stand-in ``srun``: the tasks of a step, all on this machine. Options before the command (as
# sweeps' srun launcher passes them) set the layout; the job's SLURM_NNODES and
# SLURM_NTASKS_PER_NODE are the default. Each task gets the variables slurmd would set (rank, local
# rank, node), TERM and USR1 are forwarded to every task, and the exit code is the first non-zero one.
SRUN = r'''#!/bin/bash
nodes="$SLURM_NNODES"; per="$SLURM_NTASKS_PER_NODE"
while [[ "$1" == -* ]]; do
    case "$1" in --nodes=*) nodes="${1#*=}" ;; --ntasks-per-node=*) per="${1#*=}" ;; esac
    shift
done
n=$((nodes * per)); pids=()
for ((i = 0; i < n; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$((i % per)) SLURM_NODEID=$((i / per)) SLURM_NTASKS=$n SLURM_NNODES=$nodes \
        SLURM_NTASKS_PER_NODE=$per SLURM_STEP_NUM_TASKS=$n "$@" &
    pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
rc=0
for p in "${pids[@]}"; do
    while true; do
        wait "$p"; status=$?
        kill -0 "$p" 2>/dev/null || break  # else a trapped signal interrupted the wait
    done
    [ "$rc" -eq 0 ] && rc=$status
done
exit "$rc"
'''

# A stand-in ``scontrol``: records its arguments (``requeue JOB``) in $SCONTROL_LOG.
SCONTROL = '''#!/bin/bash
echo "$*" >> "$SCONTROL_LOG"
'''


def slurm_bin(folder: Path) -> Path:
    """A folder holding the stand-in ``srun`` and ``scontrol``, to put first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def md4_tasks(pid: int) -> list[int]:
    """The ``md4`` training processes below ``pid`` (what slurmd signals for ``--signal``)."""
    found = []
    for p in descendants(pid):
        try:
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"python" in Path(argv[0].decode()).name.encode() and b"lightning_md4.cli" in argv:
            found.append(p)
    return found
