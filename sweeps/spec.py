"""A study file: what to train, what to vary, how to search and where to store it.

A study is a YAML file (see ``sweeps/studies/*.yaml``)::

    name: dropout
    base_configs: [../../configs/digits.yaml, tiny_digits.yaml]   # relative to this file
    args: [--trainer.max_steps=200]          # extra `md4 fit` arguments of every trial
    search_space:
      dropout: {type: categorical, choices: [0.05, 0.02, 0.0], arg: model.init_args.network.dropout}
      lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true, arg: model.init_args.optim.lr}
      schedule:                             # a choice may stand for several arguments
        type: categorical
        choices: [cosine, learned]
        args: {cosine: [--model.init_args.schedule=cosine], learned: [--model=GenMD4]}
    sampler: {name: grid}                   # grid, tpe, cmaes, nsga2, random (+ their keyword arguments)
    pruner: {name: median}                  # median, hyperband, threshold, none (+ keyword arguments)
    n_trials: null                          # a grid study runs its grid once
    objectives: [{metric: val/nelbo, direction: minimize}]
    report_metrics: []                      # more logged metrics for the results table
    launcher: {kind: torchrun, devices: 2, num_nodes: 1}   # python, torchrun or srun
    storage: null                           # default sqlite:///<study_dir>/study.db
    study_dir: null                         # default runs/sweeps/<name>
    heartbeat: {interval: 60, grace_period: 180}
    max_retry: 2                            # reruns of a trial whose worker died

Every key is checked: an unknown or misspelt key is a :class:`StudyError` naming it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import FloatDistribution, IntDistribution

SAMPLERS = ("grid", "tpe", "cmaes", "nsga2", "random")
PRUNERS = ("median", "hyperband", "threshold", "none")
LAUNCHERS = ("python", "torchrun", "srun")
PARAM_TYPES = ("categorical", "int", "float")


class StudyError(ValueError):
    """A study file that cannot be run as written."""


def _check_keys(where: str, given: dict[str, Any], allowed: set[str], required: set[str] = frozenset()) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise StudyError(f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(sorted(allowed))}")
    missing = sorted(required - set(given))
    if missing:
        raise StudyError(f"{where}: missing key {missing[0]!r}")


def cli_value(value: Any) -> str:
    """``value`` as jsonargparse reads it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass
class Param:
    """One dimension of the search space.

    ``arg`` is the ``md4 fit`` option it sets (``--<arg>=<value>``); for a categorical parameter
    ``args`` may instead map each choice to a list of arguments (e.g. a method switch).
    """

    name: str
    type: str
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    arg: str | None = None
    args: dict[str, list[str]] | None = None

    @classmethod
    def parse(cls, name: str, raw: Any) -> Param:
        where = f"search_space.{name}"
        if not isinstance(raw, dict):
            raise StudyError(f"{where}: expected a mapping with a 'type', got {raw!r}")
        _check_keys(where, raw, {f.name for f in fields(cls)} - {"name"}, {"type"})
        param = cls(name=name, **raw)
        if param.type not in PARAM_TYPES:
            raise StudyError(f"{where}.type: {param.type!r} is not one of {', '.join(PARAM_TYPES)}")
        if param.type == "categorical":
            if not param.choices:
                raise StudyError(f"{where}: a categorical parameter needs a non-empty 'choices' list")
            if param.args is not None:
                missing = [c for c in param.choices if cli_value(c) not in param.args]
                if missing:
                    raise StudyError(f"{where}.args: no arguments for choice {missing[0]!r}")
        elif param.low is None or param.high is None:
            raise StudyError(f"{where}: an {param.type} parameter needs 'low' and 'high'")
        if param.args is not None and param.type != "categorical":
            raise StudyError(f"{where}: 'args' (arguments per choice) is only for categorical parameters")
        param.check()
        return param

    def check(self) -> None:
        """Raise a :class:`StudyError` if Optuna would reject the range."""
        try:
            if self.type == "int":
                IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
            elif self.type == "float":
                FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)
        except ValueError as err:
            raise StudyError(f"search_space.{self.name}: {err}") from None

    def cli_args(self, value: Any) -> list[str]:
        """The ``md4 fit`` arguments that set this parameter to ``value``."""
        if self.args is not None:
            return list(self.args[cli_value(value)])
        return [f"--{self.arg or self.name}={cli_value(value)}"]

    def grid_values(self) -> list[Any]:
        """The values a grid study runs: the choices, or every step of an int/stepped float range."""
        if self.type == "categorical":
            return list(self.choices)
        if self.step is None and self.type == "float":
            raise StudyError(f"search_space.{self.name}: a grid over a float range needs a 'step'")
        step = self.step or 1
        count = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        return [self.low + i * step if self.type == "float" else int(self.low + i * step) for i in range(count)]


@dataclass
class Objective:
    metric: str = "val/nelbo"
    direction: str = "minimize"


@dataclass
class Launcher:
    """How a trial's training run starts: ``python`` (one process; Lightning starts the other
    devices), ``torchrun`` (one node, ``devices`` processes) or ``srun`` (SLURM, any nodes)."""

    kind: str = "python"
    devices: int = 1
    num_nodes: int = 1


@dataclass
class Heartbeat:
    """Optuna's heartbeat: a trial whose worker has not beaten for ``grace_period`` seconds is
    failed and rerun (see ``sweeps.storage``)."""

    interval: int = 60
    grace_period: int = 180


@dataclass
class StudySpec:
    name: str
    base_configs: list[Path]
    search_space: dict[str, Param]
    args: list[str] = field(default_factory=list)
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    n_trials: int | None = None
    objectives: list[Objective] = field(default_factory=lambda: [Objective()])
    report_metrics: list[str] = field(default_factory=list)
    launcher: Launcher = field(default_factory=Launcher)
    storage: str | None = None
    study_dir: Path | None = None
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    max_retry: int = 2

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def grid(self) -> list[dict[str, Any]]:
        """Every point of the grid, in a fixed order."""
        names = list(self.search_space)
        values = [self.search_space[n].grid_values() for n in names]
        return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> StudySpec:
    """Read and check a study file; ``overrides`` (e.g. from the command line) replace its keys, ``None`` ones
    left out."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise StudyError(f"{path} is not valid YAML: {err}") from None
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):  # merged one level deep, e.g. {"launcher": {"devices": 8}}
            value = {**(raw.get(key) or {}), **{k: v for k, v in value.items() if v is not None}}
        if value is not None:
            raw[key] = value
    return parse_spec(raw, path.parent, str(path))


def parse_spec(raw: dict[str, Any], base_dir: Path, where: str = "study") -> StudySpec:
    _check_keys(where, raw, {f.name for f in fields(StudySpec)}, {"name", "base_configs", "search_space"})
    configs = [c if Path(c).is_absolute() else base_dir / c for c in raw["base_configs"]]
    for config in configs:
        if not Path(config).is_file():
            raise StudyError(f"{where}: base config {config} does not exist")
    space = {name: Param.parse(name, p) for name, p in (raw["search_space"] or {}).items()}
    if not space:
        raise StudyError(f"{where}: search_space is empty")
    sampler = dict(raw.get("sampler") or {"name": "tpe"})
    pruner = dict(raw.get("pruner") or {"name": "median"})
    if sampler.get("name") not in SAMPLERS:
        raise StudyError(f"{where}: sampler.name {sampler.get('name')!r} is not one of {', '.join(SAMPLERS)}")
    if pruner.get("name") not in PRUNERS:
        raise StudyError(f"{where}: pruner.name {pruner.get('name')!r} is not one of {', '.join(PRUNERS)}")
    objectives = []
    for i, obj in enumerate(raw.get("objectives") or [{}]):
        _check_keys(f"{where}: objectives[{i}]", obj, {"metric", "direction"})
        objectives.append(Objective(**obj))
        if objectives[-1].direction not in ("minimize", "maximize"):
            raise StudyError(f"{where}: objectives[{i}].direction must be minimize or maximize")
    launcher_raw = raw.get("launcher") or {}
    _check_keys(f"{where}: launcher", launcher_raw, {f.name for f in fields(Launcher)})
    launcher = Launcher(**launcher_raw)
    if launcher.kind not in LAUNCHERS:
        raise StudyError(f"{where}: launcher.kind {launcher.kind!r} is not one of {', '.join(LAUNCHERS)}")
    if launcher.kind != "srun" and launcher.num_nodes > 1:
        raise StudyError(f"{where}: launcher.num_nodes {launcher.num_nodes} needs launcher.kind srun "
                         f"(a worker starts trials on its own node only)")
    heartbeat_raw = raw.get("heartbeat") or {}
    _check_keys(f"{where}: heartbeat", heartbeat_raw, {f.name for f in fields(Heartbeat)})
    spec = StudySpec(
        name=str(raw["name"]), base_configs=[Path(c) for c in configs], search_space=space,
        args=[str(a) for a in raw.get("args") or []], sampler=sampler, pruner=pruner,
        n_trials=raw.get("n_trials"), objectives=objectives, report_metrics=list(raw.get("report_metrics") or []),
        launcher=launcher, storage=raw.get("storage"),
        study_dir=Path(raw["study_dir"]) if raw.get("study_dir") else None,
        heartbeat=Heartbeat(**heartbeat_raw), max_retry=int(raw.get("max_retry", 2)))
    if spec.multi_objective and pruner["name"] != "none":
        raise StudyError(f"{where}: Optuna cannot prune multi-objective trials; set pruner: {{name: none}}")
    if sampler["name"] == "grid":
        size = len(spec.grid())
        if spec.n_trials not in (None, size):
            raise StudyError(f"{where}: a grid study runs its {size} points once; drop n_trials or set it to {size}")
        spec.n_trials = size
    elif spec.n_trials is None or spec.n_trials < 1:
        raise StudyError(f"{where}: n_trials must be a positive number for sampler {sampler['name']}")
    if spec.study_dir is None:
        spec.study_dir = Path("runs") / "sweeps" / spec.name
    return spec


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler for ask/tell workers.

    ``GridSampler.after_trial`` calls ``study.stop()`` once the grid is exhausted, which raises
    outside ``study.optimize``; workers stop by counting trials instead (``sweeps.worker``).
    Grid point ``k`` still goes to trial number ``k``, so parallel workers never share a point.
    """

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: optuna.trial.TrialState,
                    values: list[float] | None) -> None:
        pass


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    kwargs = {k: v for k, v in spec.sampler.items() if k != "name"}
    name = spec.sampler["name"]
    try:
        if name == "grid":
            search_space = {n: p.grid_values() for n, p in spec.search_space.items()}
            return AskTellGridSampler(search_space, **kwargs)
        cls = {"tpe": optuna.samplers.TPESampler, "cmaes": optuna.samplers.CmaEsSampler,
               "nsga2": optuna.samplers.NSGAIISampler, "random": optuna.samplers.RandomSampler}[name]
        return cls(**kwargs)
    except TypeError as err:
        raise StudyError(f"sampler {name}: {err}") from None


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    return build_pruner(spec.pruner)


def build_pruner(config: dict[str, Any]) -> optuna.pruners.BasePruner:
    """The pruner of a study file's ``pruner`` mapping (``name`` plus the pruner's keyword arguments)."""
    kwargs = {k: v for k, v in config.items() if k != "name"}
    name = config["name"]
    cls = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
           "threshold": optuna.pruners.ThresholdPruner, "none": optuna.pruners.NopPruner}[name]
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise StudyError(f"pruner {name}: {err}") from None
