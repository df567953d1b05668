"""A study file: what to train, what to vary, how to search and where to store it.

A study is a YAML file (see ``sweeps/studies/*.yaml``)::

    name: dropout
    base_configs: [../../configs/digits.yaml, tiny_digits.yaml]   # relative to this file
    args: [--trainer.max_steps=200]          # extra `md4 fit` arguments of every trial (a list)
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
    launcher: {kind: torchrun, devices: 2, num_nodes: 1, ddp_timeout_s: 600}   # python, torchrun or srun
    storage: null                           # default sqlite:///<study_dir>/study.db; env:NAME reads the URL
                                            # from environment variable NAME (the only way to pass a password)
    study_dir: null                         # default runs/sweeps/<name>
    heartbeat: {interval: 60, grace_period: 180}
    max_retry: 2                            # reruns of a trial whose worker died
    limits: {wall_clock_s: null, no_progress_s: null, kill_grace_s: 30}
    failures: {max_consecutive: 5, max_infra_retries: 3}
    baseline: {dropout: 0.0}                # the configuration the report's differences are against
    seeds: [0, 1, 2]                        # or repeats: 3 (= seeds 0, 1, 2); default [0]
    eval_draws: 16                          # time draws per validation sequence in the objective

**Seeds.** Every configuration runs once per seed: ``--seed_everything`` (initialisation, data order)
and ``--model.init_args.seed`` (the training noise) follow it, while the evaluation noise
(``eval_seed``) stays fixed, so every run is scored on the same draws. A grid study enumerates
configuration x seed, the seed being the grid parameter ``seed`` (one run per trial); other samplers
propose a configuration and its trial runs all its seeds (see :meth:`StudySpec.seeds_per_trial`).

**Evaluation draws.** The validation NELBO of every trial averages ``eval_draws`` keyed time draws
per sequence (``md4 fit --eval_draws``); its standard error falls like 1/sqrt(eval_draws) or faster
(the draws of a sequence are stratified), see :data:`DEFAULT_EVAL_DRAWS`.

Every key is checked before anything runs: an unknown key, a value of the wrong type (``args:`` as a
string, ``n_trials: "5"``) or out of range (``devices: 0``, ``max_retry: -1``, a heartbeat interval
not below its grace period) is a one-line :class:`StudyError` ``<file>: <key>: <problem>``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import optuna
import yaml
from optuna.distributions import FloatDistribution, IntDistribution

SAMPLERS = ("grid", "tpe", "cmaes", "nsga2", "random")
PRUNERS = ("median", "hyperband", "threshold", "none")
LAUNCHERS = ("python", "torchrun", "srun")
PARAM_TYPES = ("categorical", "int", "float")
ENV_STORAGE = "env:"  # storage: env:NAME -- the URL is in environment variable NAME
FINGERPRINT_ATTR = "study_file_fingerprint"  # study user attributes written on creation
SPEC_ATTR = "study_file"
SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "token", "secret")
SEED_PARAM = "seed"  # the seeds axis: a grid study's parameter, the key of a trial's seed_values
SEEDS_ATTR = "seed_values"  # user attribute of a trial that runs several seeds: {str(seed): objective}
DEFAULT_SEEDS = (0,)
# The validation NELBO of the tiny digits study (180 digits, 250 steps) moves between evaluation seeds
# by sd 0.072 / 0.036 / 0.015 / 0.013 nats/token with 1 / 4 / 16 / 32 draws (linear schedule), and
# 0.12 / 0.05 / 0.06 / 0.017 (polynomial k = 0.5, heavy-tailed; sds over 8 eval seeds): about
# 1/sqrt(draws). The differences the shipped studies ask about are 0.01-0.1 nats/token; 32 draws bring
# the evaluation's own noise to 0.01-0.02 for about a quarter of a tiny trial's compute (forward only).
DEFAULT_EVAL_DRAWS = 32


class StudyError(ValueError):
    """A study file that cannot be run as written. The message is always one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


# -- type checks ---------------------------------------------------------------------------------
# Plain dataclass validation rather than jsonargparse: jsonargparse reports a bad nested value as
# a multi-line tree of every union alternative it tried, while a study file's error must be one line
# naming the study-file key (``launcher.devices``, ``search_space.lr.low``).
TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path",
              list: "a list", dict: "a mapping"}
T = TypeVar("T")


def _type_word(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_word(a) for a in args)
    if origin is list:
        return f"a list of {_type_word(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return TYPE_WORDS.get(origin or hint, str(hint))


def _typed(key: str, value: Any, hint: Any) -> Any:
    """``value`` of study-file key ``key`` checked against the type ``hint`` (ints read as floats where a
    float is expected); anything else is a :class:`StudyError` naming the key."""
    if hint is Any:
        return value
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # ``X | None``: the error about X is the specific one
            return _typed(key, value, options[0])
        for option in options:
            try:
                return _typed(key, value, option)
            except StudyError:
                continue
    elif origin is list and isinstance(value, list):
        return [_typed(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    elif origin is dict and isinstance(value, dict):
        return {_typed(key, k, args[0]): _typed(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    elif hint is bool and isinstance(value, bool):
        return value
    elif hint in (int, float) and isinstance(value, int) and not isinstance(value, bool):
        return hint(value)
    elif hint is float and isinstance(value, float):
        return value
    elif hint in (str, Path) and isinstance(value, str):
        return hint(value)
    raise StudyError(f"{key}: expected {_type_word(hint)}, got {type(value).__name__} {value!r}")


def _check_keys(where: str, given: dict[str, Any], allowed: set[str], required: set[str] = frozenset()) -> None:
    """Unknown and missing keys of the mapping at ``where`` (``""``: the top level of the file)."""
    prefix = f"{where}: " if where else ""
    unknown = sorted(set(given) - allowed, key=str)
    if unknown:
        raise StudyError(f"{prefix}unknown key {unknown[0]!r}; allowed keys are {', '.join(sorted(allowed))}")
    missing = sorted(required - set(given))
    if missing:
        raise StudyError(f"{prefix}missing key {missing[0]!r}")


def _mapping(key: str, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise StudyError(f"{key}: expected a mapping, got {type(raw).__name__} {raw!r}")
    return raw


def _section(cls: type[T], key: str, raw: Any, **known: Any) -> T:
    """The dataclass ``cls`` of the study-file mapping at ``key``: keys and types checked, then its
    ``validate`` (ranges). ``known`` are fields that do not come from the mapping."""
    raw = _mapping(key, raw)
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)} - set(known)
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING} - set(known)
    _check_keys(key, raw, names, required)
    section = cls(**known, **{k: _typed(f"{key}.{k}", v, hints[k]) for k, v in raw.items()})
    section.validate(key)
    return section


def _at_least(key: str, value: float | None, low: float, strict: bool = False) -> None:
    if value is not None and (value <= low if strict else value < low):
        raise StudyError(f"{key}: must be {'above' if strict else 'at least'} {low:g}, got {value:g}")


def cli_value(value: Any) -> str:
    """``value`` as jsonargparse reads it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# -- the sections of a study file ----------------------------------------------------------------
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
        if not isinstance(name, str):
            raise StudyError(f"search_space: parameter name {name!r} is not a string")
        return _section(cls, f"search_space.{name}", raw, name=name)

    def validate(self, where: str) -> None:
        if self.type not in PARAM_TYPES:
            raise StudyError(f"{where}.type: {self.type!r} is not one of {', '.join(PARAM_TYPES)}")
        if self.type == "categorical":
            if not self.choices:
                raise StudyError(f"{where}: a categorical parameter needs a non-empty 'choices' list")
            for i, choice in enumerate(self.choices):
                if not (choice is None or isinstance(choice, (bool, int, float, str))):
                    raise StudyError(f"{where}.choices[{i}]: expected a number, string, true/false or null, "
                                     f"got {type(choice).__name__} {choice!r}")
            if self.args is not None:
                missing = [c for c in self.choices if cli_value(c) not in self.args]
                if missing:
                    raise StudyError(f"{where}.args: no arguments for choice {missing[0]!r}")
        elif self.low is None or self.high is None:
            raise StudyError(f"{where}: an {self.type} parameter needs 'low' and 'high'")
        if self.args is not None and self.type != "categorical":
            raise StudyError(f"{where}: 'args' (arguments per choice) is only for categorical parameters")
        if self.type == "int":
            for key in ("low", "high", "step"):
                value = getattr(self, key)
                if value is not None and not float(value).is_integer():
                    raise StudyError(f"{where}.{key}: an int parameter needs an integer, got {value!r}")
        self.check()

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

    def ends(self) -> list[Any]:
        """Values that bound what a sampler may draw: every choice, or both ends of the range."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "float":
            return [self.low, self.high]
        step = int(self.step or 1)
        return [int(self.low), int(self.low) + (int(self.high) - int(self.low)) // step * step]


@dataclass
class Objective:
    metric: str = "val/nelbo"
    direction: str = "minimize"

    def validate(self, where: str) -> None:
        if not self.metric:
            raise StudyError(f"{where}.metric: empty metric name")
        if self.direction not in ("minimize", "maximize"):
            raise StudyError(f"{where}.direction: must be minimize or maximize, got {self.direction!r}")


@dataclass
class Launcher:
    """How a trial's training run starts: ``python`` (one process; Lightning starts the other
    devices), ``torchrun`` (one node, ``devices`` processes) or ``srun`` (SLURM, any nodes).
    ``ddp_timeout_s`` is the trial's collective timeout, short so that ranks whose peer died exit
    instead of waiting Lightning's default 30 minutes."""

    kind: str = "python"
    devices: int = 1
    num_nodes: int = 1
    ddp_timeout_s: int = 600

    def validate(self, where: str) -> None:
        if self.kind not in LAUNCHERS:
            raise StudyError(f"{where}.kind: {self.kind!r} is not one of {', '.join(LAUNCHERS)}")
        _at_least(f"{where}.devices", self.devices, 1)
        _at_least(f"{where}.num_nodes", self.num_nodes, 1)
        _at_least(f"{where}.ddp_timeout_s", self.ddp_timeout_s, 1)
        if self.kind != "srun" and self.num_nodes > 1:
            raise StudyError(f"{where}.num_nodes: {self.num_nodes} needs launcher.kind srun "
                             f"(a worker starts trials on its own node only)")


@dataclass
class Heartbeat:
    """Optuna's heartbeat: a trial whose worker has not beaten for ``grace_period`` seconds is
    failed and rerun (see ``sweeps.storage``)."""

    interval: int = 60
    grace_period: int = 180

    def validate(self, where: str) -> None:
        _at_least(f"{where}.interval", self.interval, 1)
        if self.grace_period <= self.interval:
            # A healthy worker beats every interval: a grace period not above it fails live trials.
            raise StudyError(f"{where}.grace_period: must be above heartbeat.interval ({self.interval}), "
                             f"got {self.grace_period}")


@dataclass
class Limits:
    """Per-trial limits (seconds): ``wall_clock_s`` for the whole run, ``no_progress_s`` without a new
    training step (a hung run), and ``kill_grace_s`` between terminating a trial and killing it."""

    wall_clock_s: float | None = None
    no_progress_s: float | None = None
    kill_grace_s: float = 30.0

    def validate(self, where: str) -> None:
        for f in fields(self):
            _at_least(f"{where}.{f.name}", getattr(self, f.name), 0, strict=True)


@dataclass
class Failures:
    """Failure policy: stop the study after ``max_consecutive`` failed trials in a row; rerun a trial
    killed by the infrastructure (signal, lost node, NCCL) at most ``max_infra_retries`` times."""

    max_consecutive: int = 5
    max_infra_retries: int = 3

    def validate(self, where: str) -> None:
        _at_least(f"{where}.max_consecutive", self.max_consecutive, 1)
        _at_least(f"{where}.max_infra_retries", self.max_infra_retries, 0)


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
    limits: Limits = field(default_factory=Limits)
    failures: Failures = field(default_factory=Failures)
    baseline: dict[str, Any] | None = None  # the configuration the report compares the others against
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    eval_draws: int = DEFAULT_EVAL_DRAWS

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def seeds_per_trial(self) -> bool:
        """Whether one trial runs every seed of its configuration (TPE, CMA-ES, ...: the sampler
        learns from the mean over seeds) rather than one (configuration, seed) (grid)."""
        return self.sampler["name"] != "grid"

    def grid(self) -> list[dict[str, Any]]:
        """Every configuration of the grid (without the seed), in a fixed order."""
        names = list(self.search_space)
        values = [self.search_space[n].grid_values() for n in names]
        return [dict(zip(names, combo)) for combo in itertools.product(*values)]

    def grid_space(self) -> dict[str, list[Any]]:
        """The grid sampler's search space: the configurations' parameters x the seeds axis."""
        return {**{n: p.grid_values() for n, p in self.search_space.items()}, SEED_PARAM: list(self.seeds)}

    def seed_args(self, seed: int) -> list[str]:
        """The ``md4 fit`` arguments of a run with ``seed``: initialisation and data order
        (``seed_everything``) and training noise (``model.init_args.seed``); the evaluation noise
        (``eval_seed``) is left as configured, so every run is scored on the same draws."""
        return [f"--seed_everything={seed}", f"--model.init_args.seed={seed}"]

    def evaluation_args(self) -> list[str]:
        """The ``md4 fit`` arguments of the objective's evaluation (every validation of the run)."""
        return [f"--eval_draws={self.eval_draws}"]

    def check_points(self) -> list[dict[str, Any]]:
        """The parameter sets ``md4-sweep check`` builds: the whole grid of a grid study; for other
        samplers every parameter at each of its ends (every choice, or low and high) with the others
        at their first, i.e. each value a sampler can reach at the edge of its range."""
        if self.sampler["name"] == "grid":
            return self.grid()
        first = {name: p.ends()[0] for name, p in self.search_space.items()}
        points = [first]
        for name, p in self.search_space.items():
            points += [{**first, name: v} for v in p.ends()[1:]]
        return points


# -- reading a study file ------------------------------------------------------------------------
def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> StudySpec:
    """Read and check a study file; ``overrides`` (e.g. from the command line) replace its keys, ``None`` ones
    left out."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"{path}: no such study file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise StudyError(f"{path}: not valid YAML: {err}") from None
    try:
        raw = _mapping("study file", raw)
    except StudyError as err:
        raise StudyError(f"{path}: {err}") from None
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):  # merged one level deep, e.g. {"launcher": {"devices": 8}}
            value = {**(raw.get(key) or {}), **{k: v for k, v in value.items() if v is not None}}
        if value is not None:
            raw[key] = value
    return parse_spec(raw, path.parent, str(path))


def parse_spec(raw: dict[str, Any], base_dir: Path, where: str = "study") -> StudySpec:
    """The checked spec of a study file's mapping; every error is ``<where>: <key>: <problem>``."""
    try:
        return _parse(raw, base_dir)
    except StudyError as err:
        raise StudyError(f"{where}: {redact_secrets(str(err))}") from None


def _parse(raw: dict[str, Any], base_dir: Path) -> StudySpec:
    hints = get_type_hints(StudySpec)
    _check_keys("", raw, {f.name for f in fields(StudySpec)} | {"repeats"}, {"name", "base_configs", "search_space"})
    name = _typed("name", raw["name"], str)
    if not name:
        raise StudyError("name: empty study name")
    configs = [c if c.is_absolute() else base_dir / c for c in _typed("base_configs", raw["base_configs"], list[Path])]
    for i, config in enumerate(configs):
        if not config.is_file():
            raise StudyError(f"base_configs[{i}]: {config} does not exist")
    space = {n: Param.parse(n, p) for n, p in _mapping("search_space", raw["search_space"]).items()}
    if not space:
        raise StudyError("search_space: is empty")
    if SEED_PARAM in space:
        raise StudyError(f"search_space.{SEED_PARAM}: the seed is the seeds axis; set seeds: [0, 1, 2] or repeats: 3")
    sampler = _typed("sampler", raw.get("sampler") or {"name": "tpe"}, hints["sampler"])
    pruner = _typed("pruner", raw.get("pruner") or {"name": "median"}, hints["pruner"])
    if sampler.get("name") not in SAMPLERS:
        raise StudyError(f"sampler.name {sampler.get('name')!r} is not one of {', '.join(SAMPLERS)}")
    if pruner.get("name") not in PRUNERS:
        raise StudyError(f"pruner.name {pruner.get('name')!r} is not one of {', '.join(PRUNERS)}")
    objectives_raw = _typed("objectives", raw.get("objectives") or [{}], list[Any])
    storage = _typed("storage", raw.get("storage"), hints["storage"])
    check_storage(storage)
    spec = StudySpec(
        name=name, base_configs=configs, search_space=space,
        args=_typed("args", raw.get("args") or [], hints["args"]), sampler=sampler, pruner=pruner,
        n_trials=_typed("n_trials", raw.get("n_trials"), hints["n_trials"]),
        objectives=[_section(Objective, f"objectives[{i}]", o) for i, o in enumerate(objectives_raw)],
        report_metrics=_typed("report_metrics", raw.get("report_metrics") or [], hints["report_metrics"]),
        launcher=_section(Launcher, "launcher", raw.get("launcher")), storage=storage,
        study_dir=_typed("study_dir", raw.get("study_dir"), hints["study_dir"]),
        heartbeat=_section(Heartbeat, "heartbeat", raw.get("heartbeat")),
        max_retry=_typed("max_retry", raw.get("max_retry", 2), hints["max_retry"]),
        limits=_section(Limits, "limits", raw.get("limits")),
        failures=_section(Failures, "failures", raw.get("failures")),
        baseline=_typed("baseline", raw.get("baseline"), hints["baseline"]),
        seeds=parse_seeds(raw), eval_draws=_typed("eval_draws", raw.get("eval_draws", DEFAULT_EVAL_DRAWS), int))
    _at_least("max_retry", spec.max_retry, 0)
    _at_least("eval_draws", spec.eval_draws, 1)
    check_baseline(spec)
    if spec.multi_objective and pruner["name"] != "none":
        raise StudyError("pruner: Optuna cannot prune multi-objective trials; set pruner: {name: none}")
    if sampler["name"] == "grid":
        configurations, size = len(spec.grid()), len(spec.grid()) * len(spec.seeds)
        if spec.n_trials not in (None, size):
            raise StudyError(f"n_trials: a grid study runs its {configurations} configurations x {len(spec.seeds)} "
                             f"seeds once; drop n_trials or set it to {size}")
        spec.n_trials = size
    elif spec.n_trials is None or spec.n_trials < 1:
        raise StudyError(f"n_trials: must be a positive integer for sampler {sampler['name']}, got {spec.n_trials}")
    make_sampler(spec)  # the samplers' and pruners' own keyword checks, before anything runs
    make_pruner(spec)
    if spec.study_dir is None:
        spec.study_dir = Path("runs") / "sweeps" / spec.name
    return spec


def trial_seeds(spec: StudySpec, trial: optuna.Trial) -> list[int]:
    """The seeds ``trial`` runs: its grid parameter ``seed`` (one per trial), or every seed of the study
    when the sampler proposes configurations (:attr:`StudySpec.seeds_per_trial`)."""
    if spec.seeds_per_trial:
        return list(spec.seeds)
    return [trial.suggest_categorical(SEED_PARAM, spec.seeds)]


def parse_seeds(raw: dict[str, Any]) -> list[int]:
    """The seeds axis of a study file: ``seeds: [s, ...]`` (distinct, non-negative), or
    ``repeats: n`` for seeds 0 .. n - 1; seed 0 alone when neither is given."""
    if "seeds" in raw and "repeats" in raw:
        raise StudyError("seeds: give seeds or repeats, not both")
    if "repeats" in raw:
        repeats = _typed("repeats", raw["repeats"], int)
        _at_least("repeats", repeats, 1)
        return list(range(repeats))
    seeds = _typed("seeds", raw.get("seeds", list(DEFAULT_SEEDS)), list[int])
    if not seeds:
        raise StudyError("seeds: is empty; give at least one seed")
    for i, seed in enumerate(seeds):
        _at_least(f"seeds[{i}]", seed, 0)
    if len(set(seeds)) < len(seeds):
        repeated = next(s for s in seeds if seeds.count(s) > 1)
        raise StudyError(f"seeds: seed {repeated} is listed twice (a run with the same seed is the same run)")
    return seeds


def check_baseline(spec: StudySpec) -> None:
    """``baseline`` names search-space parameters, each at a value the study can run."""
    for name, value in (spec.baseline or {}).items():
        param = spec.search_space.get(name)
        if param is None:
            raise StudyError(f"baseline.{name}: not a search_space parameter ({', '.join(spec.search_space)})")
        if param.type == "categorical" and value not in param.choices:
            raise StudyError(f"baseline.{name}: {value!r} is not one of the choices {param.choices}")
        if param.type != "categorical" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                            or not param.low <= value <= param.high):
            raise StudyError(f"baseline.{name}: {value!r} is not in [{param.low:g}, {param.high:g}]")


def check_objective_metric(metric: str, logged: Mapping[str, Any]) -> None:
    """Raise a one-line :class:`StudyError` if the objective ``metric`` is not among the ``logged``
    metrics (a trial's ``trainer.callback_metrics`` at its first validation), so that a misspelt
    objective fails the first trial at its first validation instead of after training."""
    if metric not in logged:
        raise StudyError(f"objectives: metric {metric!r} was not logged at the first validation; "
                         f"logged: {', '.join(sorted(logged)) or 'nothing'}")


# -- storage URLs and their secrets --------------------------------------------------------------
def redact_url(url: str) -> str:
    """``url`` with its password (and password/token query values) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL urllib can split (a bad port): hide everything after the scheme
        return url.split("://", 1)[0] + "://***" if "://" in url else url
    netloc = parts.netloc
    if password is not None:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_QUERY_KEYS for k, _ in pairs):
            query = urlencode([(k, "***" if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


URL_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")


def redact_secrets(text: str) -> str:
    """``text`` with every URL in it redacted (:func:`redact_url`): for messages and saved files."""
    return URL_PATTERN.sub(lambda m: redact_url(m.group(0)), text)


def check_storage(storage: str | None) -> None:
    """A storage URL may not hold a password: it would be printed, stored in trials and saved in every
    run's config. Such a URL goes through the environment: ``storage: env:NAME``."""
    if storage is None:
        return
    if storage.startswith(ENV_STORAGE):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", storage[len(ENV_STORAGE):]):
            raise StudyError(f"storage: {storage!r} needs an environment variable name after env:")
        return
    if redact_url(storage) != storage:
        raise StudyError(f"storage: the URL {redact_url(storage)} holds a password; export it in an environment "
                         f"variable (e.g. OPTUNA_STORAGE) and write storage: env:OPTUNA_STORAGE")


def resolve_storage(url: str) -> str:
    """The storage URL itself: ``env:NAME`` read from the environment, anything else as given.

    Call it only where the storage is opened, and never print or store its result."""
    if not url.startswith(ENV_STORAGE):
        return url
    variable = url[len(ENV_STORAGE):]
    value = os.environ.get(variable)
    if not value:
        raise StudyError(f"storage: environment variable {variable} (storage: {url}) is not set")
    return value


# -- the fingerprint of a study file -------------------------------------------------------------
# Where a study runs (storage, study_dir, launcher) may differ between workers, and what its report
# compares against (baseline) may change; what its trials run may not.
WHERE_KEYS = ("storage", "study_dir", "launcher", "baseline")


def normalised(spec: StudySpec) -> dict[str, Any]:
    """What a study file says its trials run, as plain JSON values: the parsed spec (defaults filled,
    so formatting, comments and spelt-out defaults do not count) without where it runs, and the base
    configs by their parsed contents (a changed base config changes the trials; its path may not)."""
    def plain(value: Any) -> Any:
        if hasattr(value, "__dataclass_fields__"):
            return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    spec_dict = {k: v for k, v in plain(spec).items() if k not in WHERE_KEYS}
    spec_dict["base_configs"] = [_digest(yaml.safe_load(Path(c).read_text())) for c in spec.base_configs]
    return spec_dict


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def fingerprint(spec: StudySpec) -> str:
    """sha256 of :func:`normalised` ``spec``."""
    return _digest(normalised(spec))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}.{key}" if prefix else key).items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}[{i}]").items()} or {prefix: []}
    return {prefix: value}


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two :func:`normalised` specs."""
    old_flat, new_flat = _flat(old), _flat(new)
    return sorted(k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k, MISSING) != new_flat.get(k, MISSING))


def check_fingerprint(study: optuna.Study, spec: StudySpec) -> None:
    """Record the study file's fingerprint in a new study; refuse a worker whose file differs from it.

    The first worker writes :data:`FINGERPRINT_ATTR` and the normalised spec (:data:`SPEC_ATTR`, which
    names the changed keys later) into the study's user attributes."""
    digest, spec_dict = fingerprint(spec), normalised(spec)
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    if stored is None:
        study.set_user_attr(SPEC_ATTR, spec_dict)
        study.set_user_attr(FINGERPRINT_ATTR, digest)
        return
    if stored != digest:
        keys = differing_keys(study.user_attrs.get(SPEC_ATTR) or {}, spec_dict)
        shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        raise StudyError(f"study {spec.name!r} was created from another version of this study file "
                         f"(differs in: {shown or 'unknown keys'}); restore the file it was created with, "
                         f"or start a new study (another name: or --name)")


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler for ask/tell workers.

    ``GridSampler.after_trial`` calls ``study.stop()`` once the grid is exhausted, which raises
    outside ``study.optimize``; workers stop by counting trials instead (``sweeps.worker``).
    Grid point ``k`` still goes to trial number ``k``, so parallel workers never share a point.
    """

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: optuna.trial.TrialState,
                    values: list[float] | None) -> None:
        pass


class SeedPerTrial(optuna.samplers.BaseSampler):
    """A seeded sampler whose random state at trial ``n`` is that of a fresh sampler seeded ``seed + n``.

    Workers sharing a study each build their own sampler; with one seed they would all draw the
    same proposals (the same random startup points, the same TPE candidates). Trial numbers come
    from the storage and are unique, so keying the random state by them gives every trial its own
    draws on any number of workers, and the same draws when a study is run again one worker at a time.
    (Not for the grid sampler: its seed shuffles the grid, which every worker must share.)
    """

    def __init__(self, build: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._build, self._seed = build, seed
        self._sampler = build(seed)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._sampler = self._build(self._seed + trial.number)
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict[str, Any]) -> dict[str, Any]:
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str,
                           param_distribution: Any) -> Any:
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: optuna.trial.TrialState,
                    values: list[float] | None) -> None:
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The study's sampler. TPE assumes, by default, that running trials will score like the worst
    finished one (``constant_liar``), so that parallel workers spread out instead of proposing
    the same promising point; a seeded sampler other than the grid is :class:`SeedPerTrial`."""
    kwargs = {k: v for k, v in spec.sampler.items() if k != "name"}
    name = spec.sampler["name"]
    try:
        if name == "grid":
            return AskTellGridSampler(spec.grid_space(), **kwargs)
        cls = {"tpe": optuna.samplers.TPESampler, "cmaes": optuna.samplers.CmaEsSampler,
               "nsga2": optuna.samplers.NSGAIISampler, "random": optuna.samplers.RandomSampler}[name]
        if name == "tpe":
            kwargs.setdefault("constant_liar", True)
        seed = kwargs.pop("seed", None)
        if seed is None:
            return cls(**kwargs)  # seeded from the operating system: every worker draws its own
        return SeedPerTrial(lambda s: cls(seed=s, **kwargs), seed)
    except (TypeError, ValueError) as err:
        raise StudyError(f"sampler: {name}: {err}") from None


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
    except (TypeError, ValueError) as err:
        raise StudyError(f"pruner: {name}: {err}") from None
