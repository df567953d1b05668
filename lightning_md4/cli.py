"""The ``md4`` command: LightningCLI (fit, validate, test) plus sample, evaluate-samples, zeroshot, genppl.

    md4 fit --config configs/digits.yaml
    md4 test --config configs/digits.yaml --ckpt_path last
    md4 sample --ckpt_path runs/digits/checkpoints/last.ckpt --output samples.png
    md4 evaluate-samples --config configs/fid.yaml --ckpt_path runs/cifar10/checkpoints/last.ckpt

Only the standard library is imported at the top: torch and Lightning take seconds to import,
and ``md4 --help`` needs neither.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any

HELP = """usage: md4 COMMAND [options]     (md4 COMMAND --help lists the options of a command)

Train and score (Lightning's Trainer; --config YAML, then --section.key value overrides):
  fit               train: md4 fit --config configs/digits.yaml; resume a run with --ckpt_path last
                    (--strict_resume: fail when the run has no checkpoint instead of starting it)
  validate          validation NELBO of a checkpoint: --ckpt_path FILE, or last / best of the run
  test              test NELBO of a checkpoint (written to the run's TensorBoard at its step);
                    validate and test take --random_weights to score an untrained network instead
Use a checkpoint of md4 fit:
  sample            md4 sample --ckpt_path CKPT [--output samples.png]: draw samples
  evaluate-samples  md4 evaluate-samples --ckpt_path CKPT [--num_samples N --steps S --grid cosine
                    --guidance W]: FID and Inception Score of an image model
  zeroshot          md4 zeroshot --ckpt_path CKPT [--sets lambada,wikitext2 --paths lambada=FILE]:
                    zero-shot perplexity table of a text model
  genppl            md4 genppl --ckpt_path CKPT [--scorer gpt2-large]: generative perplexity and
                    unigram entropy of samples
Methods (--model): MD4, GenMD4, SEDD, D3PM.
"""

# TensorBoard's HPARAMS tab reads these scalar tags of the run as its metrics (the last value of each).
HPARAM_METRICS = ("val/nelbo", "test/nelbo")


class UsageError(ValueError):
    """A command line that cannot run: a bad option value, a missing or contradictory option."""


class ConfigError(ValueError):
    """A configuration value that its class refused when the CLI built the model, data or trainer."""


class OneLineParser(argparse.ArgumentParser):
    """argparse without abbreviations whose errors become one ``md4: error:`` line."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} ({self.prog} --help lists the options)")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def lightning_cli(argv: list[str] | None) -> None:
    """``md4 fit|validate|test`` through LightningCLI (imported here: it takes seconds)."""
    import torch
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
    from lightning.pytorch.loggers import TensorBoardLogger

    from datamodules.base import TokenDataModule
    from lightning_md4.modules.base import CheckpointError, DiffusionModule

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

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            # No predict: the models have no predict_step.
            return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
            parser.link_arguments("data.seq_len", "model.init_args.seq_len", apply_on="instantiate")
            # The evaluation protocol belongs to the run, not the model: not saved in checkpoints.
            parser.add_argument("--eval_draws", type=int, default=1,
                                help="time/mask draws averaged per sequence in the validation and test NELBO (SEDD: 1000)")
            parser.add_argument("--eval_T", type=int | None, default=None,
                                help="report the T-step discrete-time bound instead of the continuous one (MD4 only)")
            parser.add_argument("--random_weights", type=bool, default=False,
                                help="validate/test: score the untrained network instead of a --ckpt_path")
            parser.add_argument("--strict_resume", type=bool, default=False,
                                help="fit --ckpt_path last: fail when the run has no checkpoint (default: start it)")

        def before_instantiate_classes(self) -> None:
            trainer_cfg = self.config[self.subcommand].trainer
            # ``trainer.precision: null`` means bf16-mixed on a GPU and 32-bit on the CPU.
            if trainer_cfg.get("precision") is None:
                trainer_cfg.precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
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
            cfg = self.config_init[self.subcommand]
            try:
                self.model.configure_evaluation(cfg.eval_draws, cfg.eval_T)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            # Before the Trainer runs: it creates the run folder as it starts.
            self.checkpoint_step = resolve_run_checkpoint(self.subcommand, cfg, self.trainer)

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
    MD4CLI(DiffusionModule, TokenDataModule, subclass_mode_model=True, subclass_mode_data=True,
           parser_kwargs={"parser_mode": "omegaconf+", "exit_on_error": False, "allow_abbrev": False},
           save_config_callback=RunRecord, save_config_kwargs={"overwrite": True}, args=argv)


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


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


def resolve_run_checkpoint(subcommand: str, cfg: Any, trainer: Any) -> int | None:
    """Check ``--ckpt_path`` against the subcommand and replace ``last``/``best`` with the run's file.

    ``last`` and ``best`` take the newest (best) checkpoint that loads, with one stderr line naming
    the ones skipped and why. validate and test need a checkpoint that loads (or
    ``--random_weights``); ``fit --ckpt_path last`` on a run without checkpoints says so and starts
    it (requeue scripts rely on that) unless ``--strict_resume``. Returns the global step of the
    checkpoint that validate/test score.

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
    return int(ckpt.get("global_step", 0))


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


def resume_record_name(log_dir: Path) -> str:
    """``config.resume-N.yaml`` with the first ``N`` not yet in ``log_dir``."""
    n = 1
    while (log_dir / f"config.resume-{n}.yaml").exists():
        n += 1
    return f"config.resume-{n}.yaml"


def run_hparams(model: Any, datamodule: Any) -> dict[str, Any]:
    """What tells runs apart in TensorBoard's HPARAMS tab: method, schedule, network size, learning rate."""
    hp, net = model.hparams, model.net.cfg
    if "T" in hp:  # D3PM
        schedule = f"{hp.state_space}, T={hp.T}"
    elif "state_space" in hp:  # SEDD
        schedule = f"{hp.schedule} noise, {hp.state_space}"
    elif "schedule" in hp:
        schedule = hp.schedule
    else:
        schedule = "learned per token"
    if getattr(net, "kind", None) == "unet":
        network = f"unet {net.channels} channels x {net.res_blocks} blocks"
    else:
        network = f"transformer {net.n_layers} layers x {net.d_model}"
    return {"method": type(model).__name__, "schedule": schedule, "network": network,
            "parameters": sum(p.numel() for p in model.parameters()), "lr": float(model.optim_cfg.lr),
            "data": type(datamodule).__name__}


def write_hparams(logger: Any, params: dict[str, Any]) -> None:
    """The HPARAMS entry of a TensorBoard run: ``params`` with the run's NELBO tags as its metrics."""
    from torch.utils.tensorboard.summary import hparams

    for summary in hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0)):  # the values are read from the scalars
        logger.experiment.file_writer.add_summary(summary)
    logger.experiment.flush()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint, turning every way it can be broken into a clear ``CheckpointError``."""
    import torch

    from lightning_md4.modules.base import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass --ckpt_path with a .ckpt file of a fit run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint ({type(err).__name__}: "
                              f"{first_line(err)[:200]}); use another checkpoint (--ckpt_path last takes the "
                              "run's newest that loads)") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "_class_path" not in ckpt.get("hyper_parameters", {}):
        raise CheckpointError(f"checkpoint {path} was not written by `md4 fit` (no model hyper-parameters)")
    return ckpt


def resolve_class(class_path: str, base: type) -> type:
    """The class a checkpoint names, which must be a subclass of ``base`` (Lightning's loader on the
    base class would drop the subclass name and build the base)."""
    from lightning_md4.modules.base import CheckpointError

    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise CheckpointError(f"checkpoint names class {class_path!r}, which cannot be imported") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise CheckpointError(f"checkpoint names class {class_path!r}, which is not a {base.__name__}")
    return cls


def option_values(argv: list[str], option: str) -> list[str]:
    """The values given to ``option`` as ``--option VALUE`` or ``--option=VALUE``."""
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == option]
    return values + [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"{option}=")]


def check_ckpt_argument(argv: list[str]) -> None:
    """Validate a ``--ckpt_path FILE`` before LightningCLI reads it (it would fail with a traceback)."""
    # These subcommands load and check their checkpoint themselves.
    if argv[:1] in (["sample"], ["evaluate-samples"], ["zeroshot"], ["genppl"]):
        return
    for value in option_values(argv, "--ckpt_path"):
        if value not in ("last", "best", "null"):
            load_checkpoint(value)


def check_method_argument(argv: list[str]) -> None:
    """``--model NAME`` must name a method (jsonargparse would ask for a class path instead)."""
    names = [value for value in option_values(argv, "--model") if value.isidentifier()]
    if not names:
        return
    from lightning_md4 import modules

    methods = [name for name in modules.__all__ if isinstance(getattr(modules, name), type)
               and issubclass(getattr(modules, name), modules.DiffusionModule) and name != "DiffusionModule"]
    for name in names:
        if name not in methods:
            raise UsageError(f"--model {name} is not a method; choose one of {', '.join(methods)}")


def sample_main(argv: list[str]) -> None:
    """``md4 sample``: load a checkpoint (EMA weights) and write samples to a PNG grid or text file."""
    from lightning_md4.diffusion.sampling import GRIDS

    p = OneLineParser(prog="md4 sample", description=sample_main.__doc__)
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by md4 fit (e.g. .../last.ckpt)")
    p.add_argument("--num_samples", type=positive_int, default=64)
    p.add_argument("--steps", type=positive_int, default=256, help="number of sampling steps")
    p.add_argument("--grid", choices=GRIDS, default="cosine", help="time grid of the sampler")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="classifier-free guidance scale (class-conditional models, which draw the classes in turn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if there is a GPU, else cpu")
    p.add_argument("--output", default="samples.png",
                   help="PNG for image data; for text data a text file of one sample per line")
    args = p.parse_args(argv)
    import torch

    from lightning_md4.callbacks import save_samples

    device = args.device or default_device()
    model, datamodule = load_model_and_data(args.ckpt_path, device, args.guidance)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    tokens, nfe = model.sample(args.num_samples, args.steps, args.grid, generator=generator, guidance=args.guidance)
    texts = datamodule.decode(tokens.cpu())
    if texts is not None:
        out = write_text_samples(texts, args.output)
    else:  # a class-conditional model's grid: one row per class
        out = save_samples(tokens, datamodule, args.output, num_classes=model.num_classes)
    print(f"wrote {args.num_samples} samples to {out} ({args.steps} steps, {args.grid} grid, {nfe} network evaluations)")


# A sample's own line breaks are shown as this mark, so that each line of the file is one sample.
LINE_BREAK_MARK = "\u23ce"


def write_text_samples(texts: list[str], output: str | Path) -> Path:
    """Write one sample per line; line breaks inside a sample become ``LINE_BREAK_MARK``."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    lines = [text.replace("\r\n", "\n").replace("\n", LINE_BREAK_MARK) for text in texts]
    output.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return output


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model_and_data(ckpt_path: str, device: str, guidance: float = 0.0) -> tuple[Any, Any]:
    """The model (``DiffusionModule``, EMA weights) and the data module of a checkpoint written by ``md4 fit``."""
    from datamodules.base import TokenDataModule
    from lightning_md4.modules.base import CheckpointError, DiffusionModule
    from lightning_md4.modules.legacy import upgrade_hparams

    ckpt = load_checkpoint(ckpt_path)
    model_cls = resolve_class(ckpt["hyper_parameters"]["_class_path"], DiffusionModule)
    # upgrade_hparams: checkpoints saved under old hyper-parameter names load as what they were.
    model = model_cls.load_from_checkpoint(ckpt_path, map_location=device, **upgrade_hparams(ckpt["hyper_parameters"]))
    if guidance and not model.num_classes:
        raise CheckpointError(f"{ckpt_path} holds an unconditional model; --guidance needs a class-conditional "
                              "one (network.num_classes > 0)")
    data_cls = resolve_class(ckpt.get("datamodule_hyper_parameters", {}).get("_class_path", ""), TokenDataModule)
    return model, data_cls.load_from_checkpoint(ckpt_path)


def evaluate_main(argv: list[str]) -> None:
    """``md4 evaluate-samples``: draw images from a checkpoint, write a grid, and report FID and
    Inception Score against the training set (torch-fidelity; the reference statistics are cached)."""
    from jsonargparse import ActionConfigFile, ArgumentParser
    from jsonargparse.typing import PositiveInt

    from lightning_md4.diffusion.sampling import GRIDS

    p = ArgumentParser(prog="md4 evaluate-samples", description=evaluate_main.__doc__, exit_on_error=False,
                       allow_abbrev=False)
    p.add_argument("--config", action=ActionConfigFile, help="YAML with any of these options, e.g. configs/fid.yaml")
    p.add_argument("--ckpt_path", type=str, required=True, help="checkpoint written by md4 fit")
    p.add_argument("--num_samples", type=PositiveInt, default=50000)
    p.add_argument("--steps", type=PositiveInt, default=256, help="number of sampling steps")
    p.add_argument("--grid", type=str, choices=GRIDS, default="cosine", help="time grid of the sampler")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale (class-conditional models)")
    p.add_argument("--batch_size", type=PositiveInt, default=256, help="images per sampling batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=str | None, default=None, help="default: cuda if there is a GPU, else cpu")
    p.add_argument("--reference_size", type=PositiveInt | None, default=None,
                   help="training images in the FID reference (default all)")
    p.add_argument("--feature_layer_fid", type=str, default="2048", help="Inception feature of the FID")
    p.add_argument("--isc_splits", type=int, default=10, help="groups of samples the Inception Score averages over")
    p.add_argument("--inception_weights", type=str | None, default=None,
                   help="local torch-fidelity InceptionV3 weights (default: download once into torch hub's cache)")
    p.add_argument("--cache_root", type=str, default="~/.cache/lightning_md4/fidelity", help="reference statistics cache")
    p.add_argument("--output", type=str | None, default=None,
                   help="JSON of the results (default: evaluate-<checkpoint>-<steps>-<grid>-w<guidance>.json beside it)")
    args = p.parse_args(argv)
    from lightning_md4.callbacks import save_samples
    from lightning_md4.fidelity import check_isc_splits, fid_and_inception_score, inception_weights, sample_images
    from lightning_md4.modules.base import CheckpointError

    check_isc_splits(args.num_samples, args.isc_splits)
    weights = inception_weights(args.inception_weights)  # fail before sampling, not after
    device = args.device or default_device()
    model, datamodule = load_model_and_data(args.ckpt_path, device, args.guidance)
    if not hasattr(datamodule, "reference_images"):
        raise CheckpointError(f"{args.ckpt_path} is a model of {type(datamodule).__name__}, not of images; "
                              "evaluate-samples needs an image data set such as CIFAR10DataModule")
    ckpt = Path(args.ckpt_path)
    output = Path(args.output or ckpt.with_name(f"evaluate-{ckpt.stem}-{args.steps}-{args.grid}-w{args.guidance:g}.json"))
    images, nfe = sample_images(model, datamodule, args.num_samples, args.steps, args.grid, args.guidance,
                                args.batch_size, args.seed)
    grid_png = save_samples(images[:64].flatten(1).long(), datamodule, output.with_suffix(".png"),
                            num_classes=model.num_classes)
    reference = datamodule.reference_images(args.reference_size)
    metrics = fid_and_inception_score(images, reference, datamodule.reference_name, weights,
                                      Path(args.cache_root).expanduser(), args.feature_layer_fid,
                                      isc_splits=args.isc_splits, cuda=device.startswith("cuda"))
    result = {"checkpoint": str(ckpt), "num_samples": args.num_samples, "steps": args.steps, "grid": args.grid,
              "guidance": args.guidance, "network_evaluations_per_batch": nfe, "reference": datamodule.reference_name,
              "reference_size": len(reference), "feature_layer_fid": args.feature_layer_fid,
              "inception_weights": str(weights), **metrics}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"FID {metrics['fid']:.4f}, Inception Score {metrics['inception_score']:.4f} "
          f"+- {metrics['inception_score_std']:.4f} ({args.num_samples} samples, {args.steps} {args.grid} steps, "
          f"guidance {args.guidance:g}, FID against {len(reference)} training images); wrote {output} and {grid_png}")


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv in ([], ["-h"], ["--help"]):
        print(HELP, end="")
        return
    try:
        if argv[:1] == ["sample"]:
            sample_main(argv[1:])
        elif argv[:1] == ["evaluate-samples"]:
            evaluate_main(argv[1:])
        elif argv[:1] in (["zeroshot"], ["genppl"]):
            from lightning_md4 import evaluation  # imported here: it imports this module

            (evaluation.zeroshot_main if argv[0] == "zeroshot" else evaluation.genppl_main)(argv[1:])
        else:
            check_method_argument(argv)
            check_ckpt_argument(argv)
            lightning_cli(None if from_command_line else argv)
    except Exception as err:
        sys.exit(f"md4: error: {error_line(err, argv)}")


def error_line(err: Exception, argv: list[str]) -> str:
    """The one line that ``md4: error:`` reports for ``err``; the traceback itself when ``err``
    is not about the user's input (a bug, which needs the traceback)."""
    from jsonargparse import ArgumentError

    if isinstance(err, ArgumentError):
        command = f"md4 {argv[0]}" if argv[:1] in (["fit"], ["validate"], ["test"], ["evaluate-samples"]) else "md4"
        return f"{config_error_line(str(err))} ({command} --help lists the options)"
    cause = user_error(err)
    if cause is None:
        raise err
    return str(cause)


def user_error(err: BaseException | None) -> BaseException | None:
    """The bad-input error behind ``err``, if any: jsonargparse wraps errors raised while it
    instantiates the model and data, so look along the chain of causes."""
    from datamodules.base import DataError
    from lightning_md4.fidelity import FidelityError
    from lightning_md4.modules.base import CheckpointError

    user_errors = (UsageError, ConfigError, DataError, CheckpointError, FileNotFoundError, FloatingPointError,
                   FidelityError)
    while err is not None:
        if isinstance(err, user_errors):
            return err
        err = err.__cause__ or err.__context__
    return None


def config_error_line(message: str) -> str:
    """The informative part of a jsonargparse error, which nests the cause under union subtypes."""
    lines = [line.strip(" -") for line in message.splitlines() if line.strip()]
    causes = ("not accepted", "not expected", "does not exist", "No such file", "Expected a", "Unable to",
              "Not of type")
    specific = next((line for line in lines[1:] if any(c in line for c in causes) and "NoneType" not in line), "")
    return f"{lines[0]} {specific}".strip() if lines else message


if __name__ == "__main__":
    main()
