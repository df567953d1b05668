"""The ``md4`` command: LightningCLI (fit, validate, test, predict) plus ``md4 sample``.

    md4 fit --config configs/digits.yaml
    md4 test --config configs/digits.yaml --ckpt_path last
    md4 sample --ckpt_path runs/digits/checkpoints/last.ckpt --output samples.png
    md4 evaluate-samples --config configs/fid.yaml --ckpt_path runs/cifar10/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from datamodules.base import DataError, TokenDataModule
from lightning_md4.callbacks import save_samples
from lightning_md4.fidelity import FidelityError, check_isc_splits, fid_and_inception_score, inception_weights, sample_images
from lightning_md4.modules.base import CheckpointError, DiffusionModule
from lightning_md4.sampling import GRIDS


class MD4CLI(LightningCLI):
    """LightningCLI with the DataModule's vocabulary and length linked into the model."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.seq_len", "model.init_args.seq_len", apply_on="instantiate")
        # The evaluation protocol belongs to the run, not the model: not saved in checkpoints.
        parser.add_argument("--eval_draws", type=int, default=1,
                            help="time/mask draws averaged per sequence in the validation and test NELBO (SEDD: 1000)")
        parser.add_argument("--eval_T", type=int | None, default=None,
                            help="report the T-step discrete-time bound instead of the continuous one (MD4 only)")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        cfg = self.config[self.subcommand]
        try:
            self.model.configure_evaluation(cfg.eval_draws, cfg.eval_T)
        except ValueError as err:
            self.parser.error(str(err))

    def before_instantiate_classes(self) -> None:
        """``trainer.precision: null`` means bf16-mixed on a GPU and 32-bit on the CPU."""
        trainer_cfg = self.config[self.subcommand].trainer
        if trainer_cfg.get("precision") is None:
            trainer_cfg.precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"

    def before_fit(self) -> None:
        """Never overwrite an earlier run's checkpoints: a fresh fit needs an empty checkpoint folder."""
        if self.config_init[self.subcommand].get("ckpt_path") is not None:
            return
        for cb in self.trainer.checkpoint_callbacks:
            dirpath = Path(cb.dirpath) if cb.dirpath else None
            if dirpath is not None and dirpath.is_dir() and any(dirpath.glob("*.ckpt")):
                raise CheckpointError(
                    f"{dirpath} already holds checkpoints of an earlier run; resume it with --ckpt_path last, "
                    f"or start a new run with --trainer.default_root_dir <new folder>")

    def after_test(self) -> None:
        self._report("test")

    def after_validate(self) -> None:
        self._report("val")

    def _report(self, stage: str) -> None:
        metrics = self.trainer.callback_metrics
        if f"{stage}/nelbo" not in metrics or not self.trainer.is_global_zero:
            return
        nats = float(metrics[f"{stage}/nelbo"])
        name = type(self.model).__name__
        data = type(self.datamodule).__name__
        print(f"{name} on {data} {stage}: NELBO {nats:.6f} nats/token = {nats / math.log(2):.6f} "
              f"bits per dimension (perplexity {math.exp(nats):.3f})")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint, turning every way it can be broken into a clear ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass --ckpt_path with a .ckpt file of a fit run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]}); use another checkpoint, e.g. last.ckpt") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "_class_path" not in ckpt.get("hyper_parameters", {}):
        raise CheckpointError(f"checkpoint {path} was not written by `md4 fit` (no model hyper-parameters)")
    return ckpt


def resolve_class(class_path: str, base: type) -> type:
    """The class a checkpoint names, which must be a subclass of ``base`` (Lightning's loader on the
    base class would drop the subclass name and build the base)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise CheckpointError(f"checkpoint names class {class_path!r}, which cannot be imported") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise CheckpointError(f"checkpoint names class {class_path!r}, which is not a {base.__name__}")
    return cls


def check_ckpt_argument(argv: list[str]) -> None:
    """Validate a ``--ckpt_path FILE`` before LightningCLI reads it (it would fail with a traceback)."""
    # These subcommands load and check their checkpoint themselves.
    if argv[:1] in (["sample"], ["evaluate-samples"], ["zeroshot"], ["genppl"]):
        return
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--ckpt_path" and i + 1 < len(argv) else None
        if arg.startswith("--ckpt_path="):
            value = arg.split("=", 1)[1]
        if value is not None and value not in ("last", "best", "null"):
            load_checkpoint(value)


def sample_main(argv: list[str]) -> None:
    """``md4 sample``: load a checkpoint (EMA weights) and write samples to a PNG grid or text file."""
    p = argparse.ArgumentParser(prog="md4 sample", description=sample_main.__doc__)
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by md4 fit (e.g. .../last.ckpt)")
    p.add_argument("--num_samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=256, help="number of sampling steps")
    p.add_argument("--grid", choices=GRIDS, default="cosine", help="time grid of the sampler")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="classifier-free guidance scale (class-conditional models, which draw the classes in turn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default="samples.png", help="PNG for image data, text file for text data")
    args = p.parse_args(argv)
    model, datamodule = load_model_and_data(args.ckpt_path, args.device, args.guidance)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    tokens, nfe = model.sample(args.num_samples, args.steps, args.grid, generator=generator, guidance=args.guidance)
    out = save_samples(tokens, datamodule, args.output)
    print(f"wrote {args.num_samples} samples to {out} ({args.steps} steps, {args.grid} grid, {nfe} network evaluations)")


def load_model_and_data(ckpt_path: str, device: str, guidance: float = 0.0) -> tuple[DiffusionModule, TokenDataModule]:
    """The model (EMA weights) and the data module of a checkpoint written by ``md4 fit``."""
    ckpt = load_checkpoint(ckpt_path)
    model_cls = resolve_class(ckpt["hyper_parameters"]["_class_path"], DiffusionModule)
    model = model_cls.load_from_checkpoint(ckpt_path, map_location=device)
    if guidance and not model.num_classes:
        raise CheckpointError(f"{ckpt_path} holds an unconditional model; --guidance needs a class-conditional "
                              "one (network.num_classes > 0)")
    data_cls = resolve_class(ckpt.get("datamodule_hyper_parameters", {}).get("_class_path", ""), TokenDataModule)
    return model, data_cls.load_from_checkpoint(ckpt_path)


def evaluate_main(argv: list[str]) -> None:
    """``md4 evaluate-samples``: draw images from a checkpoint, write a grid, and report FID and
    Inception Score against the training set (torch-fidelity; the reference statistics are cached)."""
    p = ArgumentParser(prog="md4 evaluate-samples", description=evaluate_main.__doc__, exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="YAML with any of these options, e.g. configs/fid.yaml")
    p.add_argument("--ckpt_path", type=str, required=True, help="checkpoint written by md4 fit")
    p.add_argument("--num_samples", type=int, default=50000)
    p.add_argument("--steps", type=int, default=256, help="number of sampling steps")
    p.add_argument("--grid", type=str, choices=GRIDS, default="cosine", help="time grid of the sampler")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale (class-conditional models)")
    p.add_argument("--batch_size", type=int, default=256, help="images per sampling batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reference_size", type=int | None, default=None, help="training images in the FID reference (default all)")
    p.add_argument("--feature_layer_fid", type=str, default="2048", help="Inception feature of the FID")
    p.add_argument("--isc_splits", type=int, default=10, help="groups of samples the Inception Score averages over")
    p.add_argument("--inception_weights", type=str | None, default=None,
                   help="local torch-fidelity InceptionV3 weights (default: download once into torch hub's cache)")
    p.add_argument("--cache_root", type=str, default="~/.cache/lightning_md4/fidelity", help="reference statistics cache")
    p.add_argument("--output", type=str | None, default=None,
                   help="JSON of the results (default: evaluate-<checkpoint>-<steps>-<grid>-w<guidance>.json beside it)")
    args = p.parse_args(argv)
    check_isc_splits(args.num_samples, args.isc_splits)
    weights = inception_weights(args.inception_weights)  # fail before sampling, not after
    model, datamodule = load_model_and_data(args.ckpt_path, args.device, args.guidance)
    if not hasattr(datamodule, "reference_images"):
        raise CheckpointError(f"{args.ckpt_path} is a model of {type(datamodule).__name__}, not of images; "
                              "evaluate-samples needs an image data set such as CIFAR10DataModule")
    ckpt = Path(args.ckpt_path)
    output = Path(args.output or ckpt.with_name(f"evaluate-{ckpt.stem}-{args.steps}-{args.grid}-w{args.guidance:g}.json"))
    images, nfe = sample_images(model, datamodule, args.num_samples, args.steps, args.grid, args.guidance,
                                args.batch_size, args.seed)
    grid_png = save_samples(images[:64].flatten(1).long(), datamodule, output.with_suffix(".png"))
    reference = datamodule.reference_images(args.reference_size)
    metrics = fid_and_inception_score(images, reference, datamodule.reference_name, weights,
                                      Path(args.cache_root).expanduser(), args.feature_layer_fid,
                                      isc_splits=args.isc_splits, cuda=args.device.startswith("cuda"))
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
    # Configs write ${trainer.default_root_dir}; omegaconf+ resolves it after command-line overrides.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv in ([], ["-h"], ["--help"]):
        print("md4 sample --ckpt_path CKPT [--output samples.png]: draw samples from a checkpoint "
              "(see md4 sample --help)\n"
              "md4 evaluate-samples --ckpt_path CKPT [--num_samples N --steps S --grid cosine --guidance W]: "
              "FID and Inception Score of an image model (see md4 evaluate-samples --help)\n"
              "md4 zeroshot --ckpt_path CKPT [--sets lambada,wikitext2 --paths lambada=FILE]: zero-shot perplexity "
              "table of a text model (see md4 zeroshot --help)\n"
              "md4 genppl --ckpt_path CKPT [--scorer gpt2-large]: generative perplexity and unigram entropy of samples "
              "(see md4 genppl --help)\n")
    try:
        check_ckpt_argument(argv)
        if argv[:1] == ["sample"]:
            sample_main(argv[1:])
        elif argv[:1] == ["evaluate-samples"]:
            evaluate_main(argv[1:])
        elif argv[:1] in (["zeroshot"], ["genppl"]):
            from lightning_md4 import evaluation  # imported here: it imports this module

            (evaluation.zeroshot_main if argv[0] == "zeroshot" else evaluation.genppl_main)(argv[1:])
        else:
            MD4CLI(DiffusionModule, TokenDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   parser_kwargs={"parser_mode": "omegaconf+", "exit_on_error": False}, save_config_kwargs={"overwrite": True},
                   args=None if from_command_line else argv)
    except ArgumentError as err:
        sys.exit(f"md4: error: {config_error_line(str(err))} (md4 {' '.join(argv[:1])} --help lists the options)")
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        sys.exit(f"md4: error: {cause}")


USER_ERRORS = (DataError, CheckpointError, FileNotFoundError, FloatingPointError, FidelityError)


def user_error(err: BaseException | None) -> BaseException | None:
    """The bad-input error behind ``err``, if any: jsonargparse wraps errors raised while it
    instantiates the model and data, so look along the chain of causes."""
    while err is not None:
        if isinstance(err, USER_ERRORS):
            return err
        err = err.__cause__ or err.__context__
    return None


def config_error_line(message: str) -> str:
    """The informative part of a jsonargparse error, which nests the cause under union subtypes."""
    lines = [line.strip(" -") for line in message.splitlines() if line.strip()]
    causes = ("not accepted", "not expected", "does not exist", "No such file", "Expected a", "Unable to")
    specific = next((line for line in lines[1:] if any(c in line for c in causes) and "NoneType" not in line), "")
    return f"{lines[0]} {specific}".strip() if lines else message


if __name__ == "__main__":
    main()
