"""``md4-sweep``: run an Optuna study whose trials are (DDP) ``md4 fit`` runs, or report on it.

    md4-sweep run sweeps/studies/dropout.yaml           # a worker; start more to share the study
    md4-sweep report sweeps/studies/dropout.yaml        # table and plots of the study so far
"""

from __future__ import annotations

import argparse
import signal
import sys

from sweeps.report import write_report
from sweeps.spec import LAUNCHERS, StudyError, load_spec
from sweeps.worker import open_study, run_worker


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="md4-sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("study", help="study YAML file (see sweeps/studies)")
    parser.add_argument("--study-dir", help="folder of the trials' runs and the report (default runs/sweeps/<name>)")
    parser.add_argument("--storage", help="sqlite:///file.db, journal:/shared/file.log or an RDB URL "
                                          "(default sqlite:///<study-dir>/study.db)")
    parser.add_argument("--name", help="study name (default: the file's name key)")
    parser.add_argument("--launcher", choices=LAUNCHERS, help="how trials start (default: the study's launcher)")
    parser.add_argument("--devices", type=int, help="processes (GPUs) per node of each trial")
    parser.add_argument("--num-nodes", type=int, help="nodes of each trial (srun only)")
    args = parser.parse_args(argv)
    # SLURM and kill send SIGTERM: exit through Python so the running trial's process is stopped too
    # (its trial stays RUNNING, and is rerun once its heartbeat lapses).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    launcher = {"kind": args.launcher, "devices": args.devices, "num_nodes": args.num_nodes}
    try:
        spec = load_spec(args.study, {"study_dir": args.study_dir, "storage": args.storage, "name": args.name,
                                      "launcher": launcher})
        study = run_worker(spec) if args.command == "run" else open_study(spec)
        print(write_report(study, spec))
    except StudyError as err:
        sys.exit(f"md4-sweep: error: {err}")


if __name__ == "__main__":
    main()
