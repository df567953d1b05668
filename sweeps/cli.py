"""``md4-sweep``: run an Optuna study whose trials are (DDP) ``md4 fit`` runs, check it, or report on it.

    md4-sweep check sweeps/studies/dropout.yaml         # every grid point's md4 fit --print_config builds
    md4-sweep run sweeps/studies/dropout.yaml           # a worker; start more to share the study
    md4-sweep run --retry-failed STUDY.yaml             # rerun the failed trials (resumed), then go on
    md4-sweep report sweeps/studies/dropout.yaml        # table and plots of the study so far

A bad study file is one line ``md4-sweep: error: <file>: <key>: <problem>`` and exit status 2,
before any storage is opened or any trial started.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sweeps.spec import LAUNCHERS, StudyError, StudySpec, load_spec, redact_secrets, resolve_storage

USAGE_ERROR = 2  # argparse's exit status for a bad command line; a bad study file is one too


class CheckTrial:
    """The stand-in trial the worker's command builder gets from ``check``: no storage is touched."""

    _trial_id, number = 0, 0


def fit_command(spec: StudySpec, params: dict[str, Any], trial_dir: Path) -> list[str]:
    """The ``md4 fit`` command of a trial's first run with ``params``, as the worker builds it (the
    study's first seed, its evaluation draws), without its launcher (torchrun, srun):
    ``--print_config`` needs one process and no GPU."""
    from sweeps.worker import build_command  # imports Lightning: only for the commands that run md4

    command = build_command(spec, CheckTrial(), params, trial_dir, spec.seeds[0])
    start = command.index("lightning_md4.cli") - 1  # the "-m" after the launcher's python
    return [sys.executable, *command[start:]]


def check(spec: StudySpec, study_file: str) -> str:
    """Build every check point's ``md4 fit --print_config`` (see ``StudySpec.check_points``); raise a
    one-line :class:`StudyError` naming the first that fails, else return the summary line."""
    points = spec.check_points()
    kind = "grid points" if spec.sampler["name"] == "grid" else (
        f"points (sampler {spec.sampler['name']}: every choice and both ends of every range)")
    with tempfile.TemporaryDirectory(prefix="md4-sweep-check-") as scratch:
        for k, params in enumerate(points):
            command = fit_command(spec, params, Path(scratch) / f"trial_{k:04d}") + ["--print_config"]
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                lines = [line for line in proc.stderr.splitlines() if line.strip()] or [f"exit code {proc.returncode}"]
                raise StudyError(f"{study_file}: search_space: point {k} {params} does not build: "
                                 f"{redact_secrets(lines[-1])}")
    return f"{study_file}: {len(points)} {kind} build (md4 fit --print_config)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="md4-sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "report", "check"))
    parser.add_argument("study", help="study YAML file (see sweeps/studies)")
    parser.add_argument("--study-dir", help="folder of the trials' runs and the report (default runs/sweeps/<name>)")
    parser.add_argument("--storage", help="sqlite:///file.db, journal:/shared/file.log, an RDB URL without a "
                                          "password, or env:NAME for a URL in environment variable NAME "
                                          "(default sqlite:///<study-dir>/study.db)")
    parser.add_argument("--name", help="study name (default: the file's name key)")
    parser.add_argument("--launcher", choices=LAUNCHERS, help="how trials start (default: the study's launcher)")
    parser.add_argument("--devices", type=int, help="processes (GPUs) per node of each trial")
    parser.add_argument("--num-nodes", type=int, help="nodes of each trial (srun only)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="run: first queue a rerun of every failed trial (same parameters and folder, resumed "
                             "from its newest checkpoint) and reset the consecutive-failure count")
    parser.add_argument("--worker-index", type=int, metavar="I",
                        help="run: worker I of this machine; its trials use GPUs [I * devices, (I + 1) * devices) "
                             "of CUDA_VISIBLE_DEVICES (sets MD4_SWEEP_WORKER)")
    args = parser.parse_args(argv)
    if args.worker_index is not None and args.worker_index < 0:
        parser.error(f"--worker-index: must be at least 0, got {args.worker_index}")
    # SLURM and kill send SIGTERM: exit through Python so the running trial's process is stopped too
    # (its trial stays RUNNING, and is rerun once its heartbeat lapses).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    launcher = {"kind": args.launcher, "devices": args.devices, "num_nodes": args.num_nodes}
    try:
        spec = load_spec(args.study, {"study_dir": args.study_dir, "storage": args.storage, "name": args.name,
                                      "launcher": launcher})
        if args.command == "check":
            print(check(spec, args.study))
            return
        if spec.storage is not None:
            resolve_storage(spec.storage)  # an unset env:NAME is a study-file error, before any storage or trial
        from sweeps.report import write_report
        from sweeps.worker import WORKER_INDEX_ENV, open_study, retry_failed, run_worker

        if args.worker_index is not None:
            os.environ[WORKER_INDEX_ENV] = str(args.worker_index)  # read where the trials' environment is built
        if args.command == "run" and args.retry_failed:
            retry_failed(open_study(spec), spec)
        study = run_worker(spec) if args.command == "run" else open_study(spec)
        print(redact_secrets(write_report(study, spec)))
    except StudyError as err:
        message = redact_secrets(str(err))
        if not message.startswith(f"{args.study}: "):  # e.g. from the storage: still <file>: <key>: <problem>
            message = f"{args.study}: {message}"
        print(f"md4-sweep: error: {message}", file=sys.stderr)
        sys.exit(USAGE_ERROR)


if __name__ == "__main__":
    main()
