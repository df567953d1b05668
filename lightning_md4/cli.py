"""The ``md4`` command: LightningCLI's fit, validate and test, plus the commands that use a checkpoint
(sample, evaluate-samples, zeroshot, genppl: typed functions of :mod:`lightning_md4.commands`).

    md4 fit --config configs/digits.yaml
    md4 test --config configs/digits.yaml --ckpt_path last
    md4 sample --ckpt_path runs/digits/checkpoints/last.ckpt --output samples.png
    md4 evaluate-samples --config configs/fid.yaml --ckpt_path runs/cifar10/checkpoints/last.ckpt

torch and Lightning take seconds to import: only the commands that run import them, and
``md4 --help`` needs neither.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
import textwrap
from argparse import RawDescriptionHelpFormatter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from docstring_parser import parse as parse_docstring
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, DefaultHelpFormatter

from lightning_md4.checkpoints import default_precision, first_line, load_checkpoint
from lightning_md4.commands import COMMANDS, UsageError
from lightning_md4.modules.registry import DEFAULT_EVAL_OPTIONS, method_of, methods
from lightning_md4.preflight import CHECKPOINT_WORDS, HeldBanner, check_command_line, option_values, options_epilog

# LightningCLI's subcommands (no predict: the models have no predict_step) with their line of
# ``md4 --help``; LightningCLI itself parses their options.
LIGHTNING_COMMANDS = {
    "fit": "Train a model; --ckpt_path last resumes the run (--strict_resume: fail when there is none).",
    "validate": "Validation NELBO of a checkpoint (--ckpt_path FILE|last|best) or of --random_weights.",
    "test": "Test NELBO of a checkpoint, logged to the run's TensorBoard at its step; options as validate.",
}

# TensorBoard's HPARAMS tab reads these scalar tags of the run as its metrics (the last value of each).
HPARAM_METRICS = ("val/nelbo", "test/nelbo")

# The methods' options that change how a checkpoint is scored, not the model it holds, are declared
# by each method (``eval_options`` of its registration, :mod:`lightning_md4.modules.registry`): ``md4
# validate``/``test`` take them from the command line (or its --config) over the checkpoint's. Every
# other model option given must equal the checkpoint's (``reconcile_options``), except these, which
# are linked from the data module and checked against a checkpoint by the model as it loads one.
LINKED_OPTIONS = ("vocab_size", "seq_len")


class ConfigError(ValueError):
    """A configuration value that its class refused when the CLI built the model, data or trainer."""


class TopHelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """``md4 --help``: the description and the list of methods printed as written, one method a line."""


def command_parser() -> ArgumentParser:
    """The parser of ``md4``: every command with its line of help; the options of the commands of
    :data:`COMMANDS` from their signatures and docstrings."""
    description = textwrap.fill("Masked discrete diffusion: train and score with Lightning's Trainer (fit, validate, "
                                "test: --config YAML, then --section.key value overrides), then sample and evaluate "
                                "a checkpoint of md4 fit.", width=100)
    parser = ArgumentParser(prog="md4", exit_on_error=False, allow_abbrev=False, description=description,
                            epilog=methods_epilog(), formatter_class=TopHelpFormatter)
    subcommands = parser.add_subcommands(dest="command", required=True)
    for name, help_line in LIGHTNING_COMMANDS.items():
        subcommands.add_subcommand(name, ArgumentParser(description=help_line), help=help_line)
    for name, function in COMMANDS.items():
        doc = parse_docstring(function.__doc__)
        sub = ArgumentParser(description=" ".join(filter(None, [doc.short_description, doc.long_description])),
                             exit_on_error=False, allow_abbrev=False)
        sub.add_argument("--config", action=ActionConfigFile,
                         help="YAML with any of these options (e.g. configs/fid.yaml)")
        sub.add_function_arguments(function, as_group=False, as_positional=False)
        subcommands.add_subcommand(name, sub, help=doc.short_description)
    return parser


def methods_epilog() -> str:
    """The end of ``md4 --help``: every registered method with what it supports (read from the
    registry, which does not import torch)."""
    width = max(len(method.name) for method in methods()) + 4
    lines = [line for method in methods()
             for line in (f"  {method.name:<{width - 2}}{method.summary}", f"{'':<{width}}{method.capabilities()}")]
    return "\n".join(["Methods (--model NAME):", *lines, "", "md4 COMMAND --help lists the options of a command."])


def run_command(argv: list[str]) -> None:
    """``md4 COMMAND ...`` for a command of :data:`COMMANDS`, or ``md4 --help``."""
    parser = command_parser()
    if not argv:
        parser.print_help()
        return
    cfg = parser.parse_args(argv)
    arguments = cfg[cfg.command].as_dict()
    arguments.pop("config", None)  # the YAML files, whose values are already in the arguments
    COMMANDS[cfg.command](**arguments)


def lightning_cli(argv: list[str] | None) -> None:
    """``md4 fit|validate|test`` through LightningCLI (imported here: it takes seconds)."""
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
    from lightning.pytorch.loggers import TensorBoardLogger

    from datamodules.base import TokenDataModule
    from lightning_md4.modules.base import CheckpointError, DiffusionModule
    from lightning_md4.modules.registry import load_all

    load_all()  # every method's class, so that --model NAME resolves to it

    class RunRecord(SaveConfigCallback):
        """The run's record: ``config.yaml`` written once, by the fit that starts the run, with the
        HPARAMS of its TensorBoard; a resumed fit adds ``config.resume-N.yaml`` beside it;
        validate and test write nothing."""

        resumed = False  # set by MD4CLI.before_fit

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            if stage != "fit":
                return
            if self.resumed and not self.already_saved:
                self.config_filename = resume_record_name(Path(trainer.log_dir))
            super().setup(trainer, pl_module, stage)

        def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
            # A sweep trial's session (its hyperparameters and final state) is written by its study:
            # an entry of ours would show every trial, pruned or failed, as a success.
            if any(getattr(cb, "hparams_by_study", False) for cb in trainer.callbacks):
                return
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    write_hparams(logger, run_hparams(pl_module, trainer.datamodule))

    class MD4CLI(LightningCLI):
        """LightningCLI with the DataModule's vocabulary and length linked into the model."""

        checkpoint_step: int | None = None  # global step of the checkpoint that validate/test score
        run_loggers: list[Any] = []
        # With --ckpt_path: the model options as parsed, and the dotted keys of those that the
        # command line and its --config files set (the rest are defaults).
        parsed_model: Any = None
        given_model_options: frozenset[str] = frozenset()

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {name: LightningCLI.subcommands()[name] for name in LIGHTNING_COMMANDS}

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.epilog = options_epilog()  # the options of --model and --data are per class
            for key in LINKED_OPTIONS:
                parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")
            # The evaluation protocol belongs to the run, not the model: not saved in checkpoints.
            parser.add_argument("--eval_draws", type=int, default=1,
                                help="time/mask draws averaged per sequence in the validation and test NELBO (SEDD: 1000)")
            parser.add_argument("--eval_T", type=int | None, default=None,
                                help="report the T-step discrete-time bound instead of the continuous one (MD4 only)")
            parser.add_argument("--random_weights", type=bool, default=False,
                                help="validate/test: score the untrained network instead of a --ckpt_path")
            parser.add_argument("--strict_resume", type=bool, default=False,
                                help="fit --ckpt_path last: fail when the run has no checkpoint (default: start it)")

        def parse_arguments(self, parser: Any, args: Any) -> None:
            super().parse_arguments(parser, args)
            command = self.config.get("subcommand")
            if command is None or self.config[command].get("ckpt_path") is None:
                return
            # LightningCLI then puts a checkpoint file's hyper-parameters over every model option
            # given; before_instantiate_classes undoes that, instantiate_classes reconciles the two.
            self.parsed_model = self.config[command].model.clone()
            given = parser.parse_args(args, defaults=False)[command].get("model")
            self.given_model_options = frozenset(flat_options((given or {}).get("init_args") or {}))

        def before_instantiate_classes(self) -> None:
            if self.parsed_model is not None:
                self.config[self.subcommand].model = self.parsed_model
            trainer_cfg = self.config[self.subcommand].trainer
            if trainer_cfg.get("precision") is None:
                trainer_cfg.precision = default_precision()
            # HPARAMS shows the metrics RunRecord names, not Lightning's placeholder hp_metric = -1.
            loggers = trainer_cfg.get("logger")
            for logger in loggers if isinstance(loggers, list) else [loggers]:
                if str(getattr(logger, "class_path", "")).endswith("TensorBoardLogger"):
                    logger.init_args.default_hp_metric = False

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, TypeError) as err:  # a value its class refused, e.g. an unknown schedule
                raise ConfigError(first_line(innermost_value_error(err))) from err
            self.trainer.callbacks.append(banner.callback())  # shows the banner once the data is set up
            cfg = self.config_init[self.subcommand]
            try:
                self.model.configure_evaluation(cfg.eval_draws, cfg.eval_T)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            # Before the Trainer runs: it creates the run folder as it starts.
            checkpoint = resolve_run_checkpoint(self.subcommand, cfg, self.trainer)
            if checkpoint is None:
                return
            self.checkpoint_step = int(checkpoint.get("global_step", 0))
            if self.subcommand != "fit":  # a resumed fit trains on with the options given
                self.model = cfg.model = self.checkpoint_model(checkpoint["hyper_parameters"])

        def checkpoint_model(self, saved: dict[str, Any]) -> DiffusionModule:
            """The model that validate/test score: the checkpoint's, with the evaluation options
            given (:func:`eval_options`). Any other model option given (on the command line or in
            a --config) that differs from the checkpoint's is refused; those not given are the
            checkpoint's (Lightning's own rule for a checkpoint's hyper-parameters)."""
            model, command = self.model, self.subcommand
            theirs = str(saved.get("_class_path", "")).rsplit(".", 1)[-1]
            if theirs and theirs != type(model).__name__:
                raise UsageError(f"--model {type(model).__name__} differs from the checkpoint's {theirs}; "
                                 f"md4 {command} scores the model the checkpoint holds: pass --model {theirs}")
            from_checkpoint, conflicts = reconcile_options(dict(model.hparams), model.upgrade_hparams(saved),
                                                           self.given_model_options, eval_options(model))
            if conflicts:
                raise UsageError(conflict_line(command, conflicts))
            if not from_checkpoint:
                return model
            options = with_options({k: v for k, v in model.hparams.items() if not k.startswith("_")}, from_checkpoint)
            rebuilt = type(model)(**options)
            rebuilt.configure_evaluation(model.eval_draws, model.eval_T)
            return rebuilt

        def before_fit(self) -> None:
            """Never overwrite an earlier run's checkpoints: a fresh fit needs an empty checkpoint folder."""
            resumed = self.config_init[self.subcommand].get("ckpt_path") is not None
            for cb in self.trainer.callbacks:
                if isinstance(cb, RunRecord):
                    cb.resumed = resumed
            if resumed:
                return
            for folder in checkpoint_folders(self.trainer):
                if folder.is_dir() and any(folder.glob("*.ckpt")):
                    raise CheckpointError(
                        f"{folder} already holds checkpoints of an earlier run; resume it with --ckpt_path last, "
                        f"or start a new run with --trainer.default_root_dir <new folder>")

        def before_validate(self) -> None:
            self._detach_loggers()

        def before_test(self) -> None:
            self._detach_loggers()

        def _detach_loggers(self) -> None:
            # Lightning would log at step 0 into a new TensorBoard folder of its own making;
            # after_test writes to the run's loggers at the checkpoint's step instead.
            self.run_loggers, self.trainer.loggers = self.trainer.loggers, []

        def after_test(self) -> None:
            nats = self._report("test")
            if nats is None or self.checkpoint_step is None:  # random weights are no result of the run
                return
            for logger in self.run_loggers:
                logger.log_metrics({"test/nelbo": nats, "test/bpt": nats / math.log(2)}, step=self.checkpoint_step)
                logger.finalize("success")

        def after_validate(self) -> None:
            self._report("val")

        def _report(self, stage: str) -> float | None:
            metrics = self.trainer.callback_metrics
            if f"{stage}/nelbo" not in metrics or not self.trainer.is_global_zero:
                return None
            nats = float(metrics[f"{stage}/nelbo"])
            name = type(self.model).__name__
            data = type(self.datamodule).__name__
            print(f"{name} on {data} {stage}: NELBO {nats:.6f} nats/token = {nats / math.log(2):.6f} "
                  f"bits per dimension (perplexity {math.exp(nats):.3f})")
            return nats

    # Configs write ${trainer.default_root_dir}; omegaconf+ resolves it after command-line overrides.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    # No "Seed set to 0" or "GPU available" line before an error: the banner waits for the run.
    banner = HeldBanner().hold()
    try:
        MD4CLI(DiffusionModule, TokenDataModule, subclass_mode_model=True, subclass_mode_data=True,
               parser_kwargs={"parser_mode": "omegaconf+", "exit_on_error": False, "allow_abbrev": False},
               save_config_callback=RunRecord, save_config_kwargs={"overwrite": True}, args=argv)
    except BaseException as err:
        if isinstance(err, SystemExit) and not err.code:  # --help, --print_config
            banner.release()
        banner.drop()
        raise
    banner.release()


def innermost_value_error(err: BaseException) -> BaseException:
    """The ValueError or TypeError deepest in ``err``'s chain: the class's own message, which
    jsonargparse wraps in a list of the union subtypes it tried."""
    found, link = err, err.__cause__ or err.__context__
    while link is not None:
        if isinstance(link, (ValueError, TypeError)):
            found = link
        link = link.__cause__ or link.__context__
    return found


def checkpoint_folders(trainer: Any) -> list[Path]:
    """The folders the run's ModelCheckpoint callbacks write to."""
    return [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if cb.dirpath]


def resolve_run_checkpoint(subcommand: str, cfg: Any, trainer: Any) -> dict[str, Any] | None:
    """Check ``--ckpt_path`` against the subcommand and replace ``last``/``best`` with the run's file.

    ``last`` and ``best`` take the newest (best) checkpoint that loads, with one stderr line naming
    the ones skipped and why. validate and test need a checkpoint that loads (or
    ``--random_weights``); ``fit --ckpt_path last`` on a run without checkpoints says so and starts
    it (requeue scripts rely on that) unless ``--strict_resume``. Returns the contents of the
    checkpoint (None: none, a fresh fit or ``--random_weights``).

    Every trainer of the CLI passes here before it runs, so this is also where it gets durable,
    finite checkpoints and a checkpoint on SIGTERM (``checkpointing.install``).
    """
    from lightning_md4.checkpointing import install

    install(trainer)
    ckpt_path, folders = cfg.get("ckpt_path"), checkpoint_folders(trainer)
    where = ", ".join(map(str, folders)) or "the run (no ModelCheckpoint dirpath is set)"
    if subcommand == "fit":
        if cfg.random_weights:
            raise UsageError("--random_weights is for validate and test; fit starts from random weights anyway")
        if cfg.strict_resume and ckpt_path is None:
            raise UsageError("--strict_resume needs --ckpt_path (e.g. last)")
    elif cfg.strict_resume:
        raise UsageError("--strict_resume is for fit --ckpt_path last")
    elif ckpt_path is None and not cfg.random_weights:
        raise UsageError(f"md4 {subcommand} scores a checkpoint: pass --ckpt_path FILE, or --ckpt_path last for the run "
                         f"in {where}; --random_weights scores an untrained network")
    elif ckpt_path is not None and cfg.random_weights:
        raise UsageError(f"--random_weights and --ckpt_path {ckpt_path} contradict each other; drop one")
    if ckpt_path is None:
        return None
    if ckpt_path in ("last", "best"):
        from lightning_md4.checkpointing import skip_reasons, skipped_line
        from lightning_md4.modules.base import CheckpointError

        path, ckpt, skipped = run_checkpoint(folders, ckpt_path, Path(trainer.default_root_dir))
        if path is None and skipped:  # never start afresh over a run whose checkpoints are all torn
            raise CheckpointError(f"--ckpt_path {ckpt_path}: no checkpoint of the run loads: {skip_reasons(skipped)}")
        if skipped and trainer.is_global_zero:
            print(skipped_line(skipped, path), file=sys.stderr)
    else:
        path, ckpt = Path(ckpt_path), load_checkpoint(ckpt_path)
    if path is None and subcommand == "fit" and not cfg.strict_resume:
        if trainer.is_global_zero:
            print(f"md4: nothing to resume: {where} holds no checkpoint; starting a new run", file=sys.stderr)
        cfg["ckpt_path"] = None
        return None
    if path is None:
        raise UsageError(f"--ckpt_path {ckpt_path}: {where} holds no checkpoint; train with md4 fit first, "
                         "or pass --ckpt_path FILE")
    cfg["ckpt_path"] = str(path)
    return ckpt


def run_checkpoint(folders: list[Path], which: str,
                   root: Path | None = None) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """The run's checkpoint for ``last`` or ``best``, its contents, and why any newer one was skipped.

    ``last``: the newest checkpoint of the run that loads (``last.ckpt``, else the newest step, best
    or SLURM requeue checkpoint), so a torn ``last.ckpt`` falls back to the one before it. ``best``:
    the best checkpoint that loads among those the newest loadable checkpoint records.
    """
    from lightning_md4.checkpointing import best_candidates, newest_loadable, run_candidates

    path, ckpt, skipped = newest_loadable(run_candidates(folders, root), load_checkpoint)
    if which == "last" or ckpt is None:
        return path, ckpt, skipped
    path, ckpt, more = newest_loadable(best_candidates(ckpt.get("callbacks", {})), load_checkpoint)
    return path, ckpt, skipped + [reason for reason in more if reason not in skipped]


def plain(value: Any) -> Any:
    """``value`` with tuples as lists and Namespaces as dicts, to compare options from YAML and checkpoints."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def flat_options(options: Any, prefix: str = "") -> dict[str, Any]:
    """Nested options as dotted keys: ``{"network": {"n_layers": 1}}`` -> ``{"network.n_layers": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in plain(options).items():
        if isinstance(value, dict) and value:
            flat.update(flat_options(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def option_differences(mine: Mapping[str, Any], theirs: Mapping[str, Any],
                       prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(dotted key, mine, theirs)`` for each option whose values differ, nested dicts compared key
    by key; an option that one side lacks (added or removed since) is not compared."""
    mine, theirs = plain(mine), plain(theirs)
    for key, value in mine.items():
        if key not in theirs or value == theirs[key]:
            continue
        if isinstance(value, dict) and isinstance(theirs[key], dict):
            yield from option_differences(value, theirs[key], f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value, theirs[key]


def reconcile_options(built: Mapping[str, Any], saved: Mapping[str, Any], given: Iterable[str],
                      eval_options: Iterable[str] = DEFAULT_EVAL_OPTIONS
                      ) -> tuple[dict[str, Any], list[tuple[str, Any, Any]]]:
    """The model options of ``md4 validate``/``test`` against the checkpoint's.

    ``built``: the hyper-parameters of the model built from the command line, defaults included;
    ``saved``: the checkpoint's; ``given``: the dotted keys that the command line and its --config
    files set. Returns ``(from_checkpoint, conflicts)``: the checkpoint's value of each differing
    option that was not given, and ``(key, given value, checkpoint's value)`` of each differing
    option given that is not an evaluation option (those take effect; ``eval_options``: the
    method's, :func:`eval_options`). Options linked from the data and Lightning's own keys (``_class_path``) are left to the model's checkpoint checks.
    """
    given, eval_options = set(given), set(eval_options)
    from_checkpoint: dict[str, Any] = {}
    conflicts: list[tuple[str, Any, Any]] = []
    for key, mine, theirs in option_differences(built, saved):
        top = key.split(".")[0]
        if top.startswith("_") or top in LINKED_OPTIONS:
            continue
        if not any(key == g or key.startswith(f"{g}.") or g.startswith(f"{key}.") for g in given):
            from_checkpoint[key] = theirs
        elif top not in eval_options:
            conflicts.append((key, mine, theirs))
    return from_checkpoint, conflicts


def eval_options(model: Any) -> tuple[str, ...]:
    """The options of ``model``'s method that ``md4 validate``/``test`` take from the command line
    over the checkpoint's: they change how a checkpoint is scored, not the model it holds (each
    method declares them in its registration; D3PM adds ``exact_test``)."""
    method = method_of(model)
    return method.eval_options if method is not None else DEFAULT_EVAL_OPTIONS


def with_options(options: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the nested ``options`` with the dotted keys of ``changes`` set."""
    result = copy.deepcopy(dict(options))
    for key, value in changes.items():
        *path, last = key.split(".")
        node = result
        for part in path:
            node = node[part]
        node[last] = value
    return result


def shown(value: Any) -> str:
    """An option's value as the command line writes it (true, null, [0.9, 0.99])."""
    return value if isinstance(value, str) else json.dumps(plain(value))


def conflict_line(subcommand: str, conflicts: list[tuple[str, Any, Any]]) -> str:
    """The error for model options given to validate/test that differ from the checkpoint's."""
    differ = ", ".join(f"--model.init_args.{key} {shown(mine)} differs from the checkpoint's {shown(theirs)}"
                       for key, mine, theirs in conflicts)
    which = "the option" if len(conflicts) == 1 else "these options"
    return (f"{differ}; md4 {subcommand} scores the model the checkpoint holds: drop {which} (on the command line "
            f"and in --config) or give the checkpoint's value")


def resume_record_name(log_dir: Path) -> str:
    """``config.resume-N.yaml`` with the first ``N`` not yet in ``log_dir``."""
    n = 1
    while (log_dir / f"config.resume-{n}.yaml").exists():
        n += 1
    return f"config.resume-{n}.yaml"


def run_hparams(model: Any, datamodule: Any) -> dict[str, Any]:
    """What tells runs apart in TensorBoard's HPARAMS tab: method, schedule, network size, learning rate."""
    net = model.net.cfg
    method = method_of(model)
    if getattr(net, "kind", None) == "unet":
        network = f"unet {net.channels} channels x {net.res_blocks} blocks"
    else:
        network = f"transformer {net.n_layers} layers x {net.d_model}"
    return {"method": method.name if method else type(model).__name__, "schedule": model.schedule_summary(),
            "network": network, "parameters": sum(p.numel() for p in model.parameters()), "lr": float(model.optim_cfg.lr),
            "data": type(datamodule).__name__}


def write_hparams(logger: Any, params: dict[str, Any]) -> None:
    """The HPARAMS entry of a TensorBoard run: ``params`` with the run's NELBO tags as its metrics."""
    from torch.utils.tensorboard.summary import hparams

    for summary in hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0)):  # the values are read from the scalars
        logger.experiment.file_writer.add_summary(summary)
    logger.experiment.flush()


def check_ckpt_argument(argv: list[str]) -> None:
    """Read a ``--ckpt_path FILE`` before LightningCLI does: a corrupt one then gives one line, not a
    traceback (preflight has already checked that the file exists)."""
    for value in option_values(argv, "--ckpt_path"):
        if value not in CHECKPOINT_WORDS:
            load_checkpoint(value)


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    try:
        check_command_line(argv, LIGHTNING_COMMANDS)  # before torch: seconds sooner
        if argv[:1] and argv[0] in LIGHTNING_COMMANDS:
            check_ckpt_argument(argv)
            lightning_cli(None if from_command_line else argv)
        else:
            run_command(argv)
    except Exception as err:
        sys.exit(f"md4: error: {error_line(err, argv)}")


def error_line(err: Exception, argv: list[str]) -> str:
    """The one line that ``md4: error:`` reports for ``err``; the traceback itself when ``err``
    is not about the user's input (a bug, which needs the traceback)."""
    if isinstance(err, ArgumentError):
        command = f"md4 {argv[0]}" if argv[:1] and argv[0] in (*LIGHTNING_COMMANDS, *COMMANDS) else "md4"
        return f"{config_error_line(str(err))} ({command} --help lists the options)"
    cause = user_error(err)
    if cause is None:
        raise err
    return str(cause)


def user_error(err: BaseException | None) -> BaseException | None:
    """The bad-input error behind ``err``, if any: jsonargparse wraps errors raised while it
    instantiates the model and data, so look along the chain of causes. The error classes of
    modules that import torch are looked up only where those modules were imported (an error
    found before torch is not one of theirs), so that a one-line error never waits for torch."""
    user_errors: tuple[type, ...] = (UsageError, ConfigError, FileNotFoundError, FloatingPointError)
    for module, name in (("datamodules.base", "DataError"), ("lightning_md4.modules.base", "CheckpointError"),
                         ("lightning_md4.fidelity", "FidelityError")):
        if module in sys.modules:
            user_errors += (getattr(sys.modules[module], name),)
    while err is not None:
        if isinstance(err, user_errors):
            return err
        err = err.__cause__ or err.__context__
    return None


def config_error_line(message: str) -> str:
    """The informative part of a jsonargparse error, which nests the cause under union subtypes."""
    lines = [line.strip(" -") for line in message.splitlines() if line.strip()]
    if lines:  # jsonargparse names the key ("Parser key "steps":"); name the option the user types
        lines[0] = re.sub(r'^Parser key "([^"]+)":', r"--\1:", lines[0])
    causes = ("not accepted", "not expected", "does not exist", "No such file", "Expected a", "Unable to",
              "Not of type")
    specific = next((line for line in lines[1:] if any(c in line for c in causes) and "NoneType" not in line), "")
    return f"{lines[0]} {specific}".strip() if lines else message


if __name__ == "__main__":
    main()
