"""Two nodes on one machine: two torchrun agents on 127.0.0.1 (``--nnodes 2 --nproc-per-node 1``, c10d
rendezvous), each started through ``scripts/torchrun.sh`` as on a real node, train a tiny digits
model with gloo on the CPU.

- They train as one process does with the same global batch: the same examples at every step, the
  same losses, final weights and validation NELBO, and each checkpoint is written once.
- Elastic restart: one node (its agent and its worker) is SIGKILLed mid-run and brought back, as a
  scheduler replaces a lost node; with ``MAX_RESTARTS=1`` the job restarts from the newest
  checkpoint, ends at the planned step with the uninterrupted run's weights, and loses at most one
  checkpoint interval of steps.

Dropout and label dropout are off here: every rank draws its own dropout masks, so with dropout a
2-rank step is a different draw from a 1-process step (equal in distribution, not in value).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from faults import (DIGITS, ROOT, callbacks_config, digits_fit, env, free_port, kill_tree,
                    largest_difference, md4_tasks, read_losses, slurm_bin, wait_for_port, weights)
from lightning_md4.checkpointing import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow  # torchrun agents and md4 fit workers, each a few seconds to start

STEPS = 20  # validation and checkpoints every 10 steps
CHECKPOINT_INTERVAL = 10
# The global batch of 64 is 2 x 32 on two nodes; the 1-process reference runs under DDP too (one
# process): Lightning's DDP setup reseeds the global RNG after the model is built, so a
# single-device run shuffles its epochs from another seed (see README: Fault tolerance).
LAYOUT = ["--data.init_args.batch_size=null", "--data.init_args.global_batch_size=64", "--trainer.accelerator=cpu",
          "--model.init_args.network.dropout=0", "--model.init_args.network.label_dropout=0"]
TIMEOUT = 300  # seconds for any one run


def agent(tmp: Path, name: str, port: int, args: list[str], max_restarts: int = 0) -> subprocess.Popen:
    """One node: ``scripts/torchrun.sh`` with ``NNODES=2``, its output in ``tmp/name.log``."""
    node_env = env(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   LOCAL_ADDR="127.0.0.1", RDZV_ID=f"md4-test-{port}", RDZV_CONF="join_timeout=120",
                   MAX_RESTARTS=str(max_restarts), GLOO_SOCKET_IFNAME="lo")
    with open(tmp / f"{name}.log", "a") as log:
        return subprocess.Popen(["bash", str(ROOT / "scripts" / "torchrun.sh"), *args], cwd=tmp, env=node_env,
                                stdout=log, stderr=subprocess.STDOUT)


def start_two_nodes(tmp: Path, name: str, args: list[str], max_restarts: int = 0) -> tuple[int, list[subprocess.Popen]]:
    """Node 0 first, so that it hosts the rendezvous (c10d's store lives in its agent), then node 1."""
    port = free_port()
    first = agent(tmp, f"{name}.node0", port, args, max_restarts)
    assert wait_for_port(port, 60), (tmp / f"{name}.node0.log").read_text()[-3000:]
    return port, [first, agent(tmp, f"{name}.node1", port, args, max_restarts)]


def finish(tmp: Path, name: str, nodes: list[subprocess.Popen]) -> None:
    try:
        codes = [node.wait(timeout=TIMEOUT) for node in nodes]
    finally:
        for node in nodes:
            kill_tree(node.pid)
    logs = "\n".join((tmp / f"{name}.node{i}.log").read_text()[-3000:] for i in range(2))
    assert codes == [0, 0], logs


def files(tmp: Path, name: str, steps: int, *extra: str) -> tuple[Path, list[str]]:
    """The run folder and the md4 fit arguments (without ``fit``) of a logged run ``name``."""
    cfg = callbacks_config(tmp / f"{name}.yaml", tmp / f"{name}.{{rank}}.loss", *extra, val_log=tmp / f"{name}.val",
                           save_log=tmp / f"{name}.saves")
    run = tmp / name
    return run, digits_fit(run, steps, cfg, *LAYOUT, "--ckpt_path", "last")[1:]


def lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory) -> tuple[Path, Path]:
    """The uninterrupted runs, side by side: in one process (DDP on one process, see LAYOUT) and on
    two nodes; their folders."""
    one, two = tmp_path_factory.mktemp("one_process"), tmp_path_factory.mktemp("two_nodes")
    _, args = files(one, "ref", STEPS)
    reference = subprocess.Popen([sys.executable, "-m", "lightning_md4.cli", "fit", *args, "--trainer.strategy=ddp"],
                                 cwd=one, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, args = files(two, "multi", STEPS)
        _, nodes = start_two_nodes(two, "multi", args)
        finish(two, "multi", nodes)
        _, err = reference.communicate(timeout=TIMEOUT)
        assert reference.returncode == 0, err[-3000:]
    finally:
        kill_tree(reference.pid)
    return one, two


@pytest.fixture(scope="module")
def two_nodes(clean_runs) -> Path:
    return clean_runs[1]


def test_two_nodes_train_as_one_process_with_the_same_global_batch(clean_runs):
    reference, two_nodes = clean_runs
    ref, rank0, rank1 = (lines(p) for p in (reference / "ref.0.loss", two_nodes / "multi.0.loss",
                                           two_nodes / "multi.1.loss"))
    assert [r[0] for r in ref] == [r[0] for r in rank0] == [r[0] for r in rank1] == [str(s) for s in range(1, STEPS + 1)]
    # Rank r trains on part r of the same global batch (the example indices of each step) ...
    assert all(a[2] == f"{b[2]},{c[2]}" for a, b, c in zip(ref, rank0, rank1))
    # ... and the mean of the two ranks' losses is the 1-process loss.
    assert max(abs(float(a[1]) - (float(b[1]) + float(c[1])) / 2) for a, b, c in zip(ref, rank0, rank1)) <= 1e-5
    final = two_nodes / "multi" / "checkpoints" / "last.ckpt"
    assert torch.load(final, weights_only=True)["global_step"] == STEPS
    assert largest_difference(weights(final), weights(reference / "ref" / "checkpoints" / "last.ckpt")) <= 1e-5
    # The validation NELBO (on the EMA weights, its examples split over the ranks) is the same number.
    val, ref_val = lines(two_nodes / "multi.val"), lines(reference / "ref.val")
    assert [v[0] for v in val] == [v[0] for v in ref_val] == ["10", "20"]
    assert max(abs(float(a[1]) - float(b[1])) for a, b in zip(val, ref_val)) <= 1e-5
    # Every checkpoint was written once, by one process (global rank 0), as in the 1-process run.
    saves, ref_saves = lines(two_nodes / "multi.saves"), lines(reference / "ref.saves")
    assert len({pid for pid, _, _ in saves}) == 1
    assert sorted((step, Path(path).name) for _, step, path in saves) == \
        sorted((step, Path(path).name) for _, step, path in ref_saves)
    assert len(saves) == len({(step, path) for _, step, path in saves}) == 6  # last, best and step file at 10 and 20


def test_a_node_killed_mid_run_restarts_from_the_last_checkpoint(two_nodes, tmp_path):
    """SIGKILL node 1 (its agent and its worker) after step 12, then start it again with the same
    command, as a scheduler replaces a lost node: node 0's agent (MAX_RESTARTS=1) restarts its
    worker, the two meet again, and the run resumes from its newest checkpoint (step 10)."""
    _, args = files(tmp_path, "elastic", STEPS, "{class_path: faults.Pause, init_args: {after: 12, seconds: 0.5}}")
    port, nodes = start_two_nodes(tmp_path, "elastic", args, max_restarts=1)
    log = tmp_path / "elastic.0.loss"
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and all(n.poll() is None for n in nodes):
            if log.exists() and max(map(int, (r[0] for r in lines(log))), default=0) >= 12:
                break
            time.sleep(0.05)
        reached = max(int(r[0]) for r in lines(log))
        assert 12 <= reached < STEPS and all(n.poll() is None for n in nodes)
        kill_tree(nodes[1].pid)
        nodes[1].wait(timeout=30)
        nodes[1] = agent(tmp_path, "elastic.node1", port, args, max_restarts=1)  # the node comes back
        finish(tmp_path, "elastic", nodes)
    finally:
        for node in nodes:
            kill_tree(node.pid)

    steps = [int(r[0]) for r in lines(log)]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    resumed_from, lost = steps[restart] - 1, steps[restart - 1] - (steps[restart] - 1)
    print(f"elastic restart: killed at step {steps[restart - 1]}, resumed from step {resumed_from}, "
          f"{lost} step(s) lost (checkpoint interval {CHECKPOINT_INTERVAL})")
    assert resumed_from == CHECKPOINT_INTERVAL and 0 < lost <= CHECKPOINT_INTERVAL
    assert steps[restart:] == list(range(resumed_from + 1, STEPS + 1))  # to the planned step
    assert "Restoring states from the checkpoint path at" in "".join(
        (tmp_path / f"elastic.node{i}.log").read_text() for i in range(2))
    # The steps done twice, and all the others, have the uninterrupted run's losses on both ranks.
    for rank in range(2):
        clean = read_losses(two_nodes / f"multi.{rank}.loss")
        for step, loss in (map(float, r[:2]) for r in lines(tmp_path / f"elastic.{rank}.loss")):
            assert abs(loss - clean[int(step)]) <= 1e-6, (rank, step)
    final = tmp_path / "elastic" / "checkpoints" / "last.ckpt"
    assert torch.load(final, weights_only=True)["global_step"] == STEPS
    assert largest_difference(weights(final), weights(two_nodes / "multi" / "checkpoints" / "last.ckpt")) <= 1e-6


def test_slurm_train_job_requeued_near_its_time_limit_and_preempted_resumes_exactly(two_nodes, tmp_path):
    """scripts/slurm/train.sbatch under a stand-in srun (2 nodes x 1 task on this machine) and
    scontrol. Job 1 gets SIGUSR1 (``--signal=SIGUSR1@90``, the time limit near): it saves last.ckpt
    at the end of the batch and requeues itself. Job 2 (the requeued one) gets SIGTERM (preemption)
    and saves last.ckpt. Job 3 finishes. Together they are the uninterrupted 2-node run."""
    bin_dir = slurm_bin(tmp_path / "bin")
    cfg = callbacks_config(tmp_path / "slurm.yaml", tmp_path / "slurm.{rank}.loss",
                           "{class_path: faults.Pause, init_args: {after: 3, seconds: 0.2}}",
                           val_log=tmp_path / "slurm.val", save_log=tmp_path / "slurm.saves")
    run = tmp_path / "slurm"
    fit_args = digits_fit(run, STEPS, cfg, *LAYOUT)[3:]  # without fit --config digits.yaml, the job's own
    scontrol_log = tmp_path / "scontrol.log"
    job_env = env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable, SLURM_JOB_ID="4242",
                  SLURM_JOB_NAME="md4", SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="1", SLURM_NODELIST="localhost",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo",
                  SCONTROL_LOG=str(scontrol_log))
    log = tmp_path / "slurm.0.loss"

    def job(signal_at: int | None, signum: int | None) -> tuple[int, int | None]:
        """Run the batch script; send ``signum`` to its tasks once step ``signal_at`` is logged."""
        with open(tmp_path / "jobs.log", "a") as out:
            proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "slurm" / "train.sbatch"), DIGITS, str(run),
                                     *fit_args], cwd=tmp_path, env=job_env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + TIMEOUT
            while signal_at is not None and time.monotonic() < deadline and proc.poll() is None:
                if log.exists() and max((int(r[0]) for r in lines(log)), default=0) >= signal_at:
                    tasks = md4_tasks(proc.pid)
                    assert len(tasks) == 2
                    for task in tasks:
                        os.kill(task, signum)
                    break
                time.sleep(0.05)
            code = proc.wait(timeout=TIMEOUT)
        finally:
            kill_tree(proc.pid)
        last = run / "checkpoints" / "last.ckpt"
        return code, torch.load(last, weights_only=True)["global_step"] if last.exists() else None

    code1, step1 = job(4, signal.SIGUSR1)
    assert code1 == PREEMPTED_EXIT_CODE and 4 <= step1 < 10, (tmp_path / "jobs.log").read_text()[-3000:]
    assert scontrol_log.read_text().splitlines() == ["requeue 4242"]
    code2, step2 = job(13, signal.SIGTERM)
    assert code2 == PREEMPTED_EXIT_CODE and 13 <= step2 < STEPS, (tmp_path / "jobs.log").read_text()[-3000:]
    assert scontrol_log.read_text().splitlines() == ["requeue 4242"]  # SLURM requeues a preempted job itself
    code3, step3 = job(None, None)
    assert (code3, step3) == (0, STEPS), (tmp_path / "jobs.log").read_text()[-3000:]
    text = (tmp_path / "jobs.log").read_text()
    assert text.count("Restoring states from the checkpoint path at") == 2
    assert f"md4: SIGUSR1 (the time limit is near): saved {run / 'checkpoints' / 'last.ckpt'} at step {step1}" in text
    assert "md4: requeued SLURM job 4242" in text
    for rank in range(2):  # every step once, with the uninterrupted run's loss
        clean, got = read_losses(two_nodes / f"multi.{rank}.loss"), lines(tmp_path / f"slurm.{rank}.loss")
        assert [int(r[0]) for r in got] == list(range(1, STEPS + 1))
        assert max(abs(float(r[1]) - clean[int(r[0])]) for r in got) <= 1e-6
    final = run / "checkpoints" / "last.ckpt"
    assert largest_difference(weights(final), weights(two_nodes / "multi" / "checkpoints" / "last.ckpt")) <= 1e-6
