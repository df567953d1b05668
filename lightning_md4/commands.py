"""The commands of ``md4`` that use a checkpoint of ``md4 fit``: sample, evaluate-samples, zeroshot, genppl.

Each is a typed function whose signature and docstring are its command line: ``md4`` builds the
options from them with jsonargparse (``md4 sample --help``). torch and Lightning are imported in
the function bodies, so that ``md4 --help`` reads the signatures without importing them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from jsonargparse.typing import NonNegativeInt, PositiveInt

from lightning_md4.checkpoints import FitCheckpoint, default_device, default_precision, first_line

# The sampler's time grids (lightning_md4.diffusion.sampling.GRIDS, which imports torch).
Grid = Literal["uniform", "cosine"]

# A sample's own line breaks are shown as this mark, so that each line of the file is one sample.
LINE_BREAK_MARK = "\u23ce"


class UsageError(ValueError):
    """A command line that cannot run: a bad option value, a missing or contradictory option."""


def sample(ckpt_path: str, num_samples: PositiveInt = 64, steps: PositiveInt = 256, grid: Grid = "cosine",
           guidance: float = 0.0, seed: int = 0, device: str | None = None, output: str | None = None) -> None:
    """Draw samples from a checkpoint (its EMA weights) into a PNG grid or a text file.

    Args:
        ckpt_path: checkpoint written by md4 fit (e.g. .../last.ckpt)
        num_samples: samples to draw
        steps: number of sampling steps
        grid: time grid of the sampler
        guidance: classifier-free guidance scale (class-conditional models, which draw the classes in turn)
        seed: seed of the sampler's draws
        device: default: cuda if there is a GPU, else cpu
        output: a PNG grid for image data (default samples.png); for text data a text file of one sample per
            line (default samples.txt)
    """
    import torch

    from lightning_md4.callbacks import save_samples

    device = resolve_device(device)
    model, datamodule = load_sampler(ckpt_path, device, guidance)
    output = sample_output(output, ckpt_path, datamodule)
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens, nfe = model.sample(num_samples, steps, grid, generator=generator, guidance=guidance)
    texts = datamodule.decode(tokens.cpu())
    if texts is not None:
        out = write_text_samples(texts, output)
    else:  # a class-conditional model's grid: one row per class
        out = save_samples(tokens, datamodule, output, num_classes=model.num_classes)
    print(f"wrote {num_samples} samples to {out} ({steps} steps, {grid} grid, {nfe} network evaluations)")


def evaluate_samples(ckpt_path: str, num_samples: PositiveInt = 50000, steps: PositiveInt = 256,
                     grid: Grid = "cosine", guidance: float = 0.0, batch_size: PositiveInt = 256, seed: int = 0,
                     device: str | None = None, reference_size: PositiveInt | None = None,
                     feature_layer_fid: str = "2048", isc_splits: PositiveInt = 10,
                     inception_weights: str | None = None, cache_root: str = "~/.cache/lightning_md4/fidelity",
                     output: str | None = None) -> None:
    """FID and Inception Score of an image model's samples against its training set.

    Draws images from the checkpoint, writes a grid of them, and scores them with torch-fidelity
    (the reference statistics are cached). configs/fid.yaml holds the paper's protocol.

    Args:
        ckpt_path: checkpoint written by md4 fit
        num_samples: images to draw
        steps: number of sampling steps
        grid: time grid of the sampler
        guidance: classifier-free guidance scale (class-conditional models)
        batch_size: images per sampling batch
        seed: seed of the sampler's draws
        device: default: cuda if there is a GPU, else cpu
        reference_size: training images in the FID reference (default all)
        feature_layer_fid: Inception feature of the FID
        isc_splits: groups of samples the Inception Score averages over
        inception_weights: local torch-fidelity InceptionV3 weights (default: download once into torch hub's cache)
        cache_root: reference statistics cache
        output: JSON of the results (default: evaluate-<checkpoint>-<steps>-<grid>-w<guidance>.json beside it)
    """
    from lightning_md4 import fidelity
    from lightning_md4.callbacks import save_samples
    from lightning_md4.modules.base import CheckpointError

    fidelity.check_isc_splits(num_samples, isc_splits)
    weights = fidelity.inception_weights(inception_weights)  # fail before sampling, not after
    device = resolve_device(device)
    model, datamodule = load_sampler(ckpt_path, device, guidance)
    if not hasattr(datamodule, "reference_images"):
        raise CheckpointError(f"{ckpt_path} is a model of {type(datamodule).__name__}, not of images; "
                              "evaluate-samples needs an image data set such as CIFAR10DataModule")
    ckpt = Path(ckpt_path)
    result_file = Path(output or ckpt.with_name(f"evaluate-{ckpt.stem}-{steps}-{grid}-w{guidance:g}.json"))
    images, nfe = fidelity.sample_images(model, datamodule, num_samples, steps, grid, guidance, batch_size, seed)
    grid_png = save_samples(images[:64].flatten(1).long(), datamodule, result_file.with_suffix(".png"),
                            num_classes=model.num_classes)
    reference = datamodule.reference_images(reference_size)
    metrics = fidelity.fid_and_inception_score(images, reference, datamodule.reference_name, weights,
                                               Path(cache_root).expanduser(), feature_layer_fid,
                                               isc_splits=isc_splits, cuda=device.startswith("cuda"))
    result = {"checkpoint": str(ckpt), "num_samples": num_samples, "steps": steps, "grid": grid,
              "guidance": guidance, "network_evaluations_per_batch": nfe, "reference": datamodule.reference_name,
              "reference_size": len(reference), "feature_layer_fid": feature_layer_fid,
              "inception_weights": str(weights), **metrics}
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    print(f"FID {metrics['fid']:.4f}, Inception Score {metrics['inception_score']:.4f} "
          f"+- {metrics['inception_score_std']:.4f} ({num_samples} samples, {steps} {grid} steps, "
          f"guidance {guidance:g}, FID against {len(reference)} training images); wrote {result_file} and {grid_png}")


def zeroshot(ckpt_path: str, sets: str | None = None, paths: dict[str, str] | None = None,
             data_dir: str = "~/.cache/lightning_md4/zeroshot", tokenizer: str | None = None,
             eval_draws: PositiveInt = 1000, eval_T: PositiveInt | None = None, batch_size: PositiveInt = 8,
             num_workers: NonNegativeInt = 2, devices: int | str = "auto", num_nodes: PositiveInt = 1,
             output: str | None = None) -> None:
    """Zero-shot perplexity table of a text model, printed and saved beside the checkpoint.

    Each set is scored by trainer.test with the NELBO averaged over eval_draws keyed time draws per
    sequence; perplexity is exp(total nats / total tokens) over the whole set.

    Args:
        ckpt_path: checkpoint written by md4 fit
        sets: comma-separated zero-shot sets, e.g. lambada,wikitext2 (default: all of them)
        paths: local files of sets, --paths.SET FILE (the others are loaded from the Hugging Face hub)
        data_dir: folder of the token caches
        tokenizer: default: the checkpoint's data tokenizer, else gpt2
        eval_draws: time draws averaged per sequence (SEDD: 1000)
        eval_T: report the T-step discrete-time bound instead
        batch_size: sequences per device and batch
        num_workers: data loader workers
        devices: devices per node (Lightning's trainer.devices)
        num_nodes: nodes (Lightning's trainer.num_nodes)
        output: table file (.md; a .json twin is written); default: zeroshot-<checkpoint name>.md beside the checkpoint
    """
    import torch

    from lightning_md4.evaluation import format_table, zeroshot_table

    chosen = zeroshot_sets(sets, paths or {})
    ckpt = FitCheckpoint.read(ckpt_path)
    model = ckpt.model("cpu")  # the Trainer moves it to its devices
    # Lightning picks DDP for several devices; each rank tests its share of the blocks.
    trainer_kwargs = {"devices": devices, "num_nodes": num_nodes, "precision": default_precision()}
    try:
        rows = zeroshot_table(model, chosen, trainer_kwargs, tokenizer or ckpt.tokenizer, data_dir, batch_size,
                              eval_draws, eval_T, num_workers)
    except ValueError as err:  # a bad evaluation setting, e.g. eval_T for a method without that bound
        raise UsageError(str(err)) from None
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    table = format_table(rows, f"{type(model).__name__} {ckpt.path}: zero-shot perplexity")
    table_file = Path(output) if output else ckpt.path.parent / f"zeroshot-{ckpt.path.stem}.md"
    table_file.parent.mkdir(parents=True, exist_ok=True)
    table_file.write_text(table + "\n")
    table_file.with_suffix(".json").write_text(
        json.dumps([{**asdict(row), "perplexity": row.perplexity} for row in rows], indent=1) + "\n")
    print(table)
    print(f"\nsaved to {table_file} and {table_file.with_suffix('.json')}")


def zeroshot_sets(names: str | None, paths: dict[str, str]) -> dict[str, str | None]:
    """The chosen sets, each with its local file or ``None`` (the hub)."""
    from datamodules.zeroshot import SETS

    chosen: dict[str, str | None] = dict.fromkeys(SETS if names is None else
                                                  [name.strip() for name in names.split(",") if name.strip()])
    if not chosen:
        raise UsageError(f"--sets names no set; choose from {', '.join(SETS)}")
    for name in chosen:
        if name not in SETS:
            raise UsageError(f"unknown zero-shot set {name!r}; choose from {', '.join(SETS)}")
    for name, path in paths.items():
        if name not in chosen:
            raise UsageError(f"--paths.{name}: {name} is not one of --sets ({', '.join(chosen)})")
        chosen[name] = path
    return chosen


def genppl(ckpt_path: str, scorer: str = "gpt2-large", num_samples: PositiveInt = 64, steps: PositiveInt = 1000,
           grid: Grid = "uniform", batch_size: PositiveInt = 16, tokenizer: str | None = None, seed: int = 0,
           device: str | None = None, output: str | None = None) -> None:
    """Generative perplexity and unigram entropy of a text model's samples.

    A causal LM scorer reads the samples decoded to text and retokenized by its own tokenizer; an AR
    checkpoint of this suite scores the sampled token ids themselves, and must have been trained on
    the same data module and vocabulary (for CharDataModule, the same characters in the same order;
    for word-piece data, the same tokenizer). The unigram entropy exposes low-diversity samples
    that a low generative perplexity would flatter.

    Args:
        ckpt_path: checkpoint written by md4 fit
        scorer: causal LM (hub name or local folder), or an AR checkpoint (.ckpt) of md4 fit on the same data
        num_samples: samples to draw
        steps: sampling steps
        grid: time grid of the sampler
        batch_size: samples drawn and scored per batch
        tokenizer: default: the checkpoint's data tokenizer, else gpt2
        seed: seed of the sampler's draws
        device: default: cuda if there is a GPU, else cpu
        output: JSON with the numbers and the sample texts; default: genppl-<checkpoint name>.json beside the checkpoint
    """
    import torch

    from datamodules.tokenizer import load_tokenizer
    from lightning_md4.evaluation import (ar_nll, causal_lm_nll, is_checkpoint_path, load_ar_scorer, load_causal_lm,
                                          perplexity, unigram_entropy)

    device = resolve_device(device)
    ckpt = FitCheckpoint.read(ckpt_path)
    # Samples become text by the data's tokenizer (word pieces), else by the data module's own
    # decoding (characters); a causal LM needs text. Checked, like the scorer, before anything is
    # loaded onto the device or sampled (a hub scorer is gigabytes).
    if tokenizer is not None or "tokenizer" in ckpt.data_hparams:
        text_tokenizer = load_tokenizer(tokenizer or ckpt.tokenizer)

        def decode(tokens: torch.Tensor) -> list[str]:
            return [text_tokenizer.decode(row.tolist()) for row in tokens]
    else:
        decode = ckpt.datamodule().decode
        if decode(torch.zeros(1, 1, dtype=torch.long)) is None and not is_checkpoint_path(scorer):
            raise UsageError(f"{ckpt_path} is a model of {ckpt.data_hparams.get('_class_path')}, not of text; a causal "
                             "language model scores text: pass --scorer an AR checkpoint of the same data")
    if is_checkpoint_path(scorer):
        ar_scorer, scorer_lm = load_ar_scorer(scorer, ckpt, device), None
    else:
        ar_scorer, (scorer_lm, scorer_tokenizer) = None, load_causal_lm(scorer, device)
    model = ckpt.model(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = []
    for start in range(0, num_samples, batch_size):
        tokens, _ = model.sample(min(batch_size, num_samples - start), steps, grid, generator=generator)
        samples.append(tokens.cpu())
    tokens = torch.cat(samples)
    texts = decode(tokens)
    if ar_scorer is not None:
        nll, count = ar_nll(ar_scorer, tokens, batch_size)
    else:
        nll, count = causal_lm_nll(texts, scorer_lm, scorer_tokenizer, batch_size)
    result = {"checkpoint": str(ckpt.path), "scorer": scorer, "num_samples": num_samples, "steps": steps,
              "grid": grid, "generative_perplexity": perplexity(nll, count), "scored_tokens": count,
              "unigram_entropy": float(unigram_entropy(tokens).mean()),
              "samples": texts if texts is not None else tokens.tolist()}
    result_file = Path(output) if output else ckpt.path.parent / f"genppl-{ckpt.path.stem}.json"
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{type(model).__name__} {ckpt.path}: {num_samples} samples, {steps} steps ({grid} grid); "
          f"generative perplexity under {scorer} {result['generative_perplexity']:.2f} over {count:,} tokens, "
          f"unigram entropy {result['unigram_entropy']:.3f} nats; saved to {result_file}")


def resolve_device(device: str | None) -> str:
    """``device``, checked against this machine (a GPU asked for where there is none is a one-line
    error, not torch's traceback as it moves the weights); ``None``: cuda if there is a GPU, else cpu."""
    import torch

    if device is None:
        return default_device()
    try:
        kind = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"--device {device} is not a device ({first_line(err)}); pass cpu, cuda or cuda:N") from None
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {device}: this machine has no CUDA GPU that torch can use; pass --device cpu, "
                             "or leave --device out (cuda where there is a GPU, else cpu)")
        if kind.index is not None and kind.index >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA GPU{'s' if count > 1 else ''}, "
                             f"cuda:0 to cuda:{count - 1}")
    elif kind.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: this machine has no MPS device; pass --device cpu")
    elif kind.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: md4 runs on cpu, cuda or mps")
    return device


def sample_output(output: str | None, ckpt_path: str, datamodule: Any) -> Path:
    """The file ``md4 sample`` writes: a PNG grid for an image model, a text file otherwise (one
    sample per line). An ``--output`` of the other kind is refused before anything is sampled."""
    import torch

    data = type(datamodule).__name__
    images = datamodule.to_images(torch.zeros(1, datamodule.seq_len, dtype=torch.long)) is not None
    if output is None:
        return Path("samples.png" if images else "samples.txt")
    png = Path(output).suffix.lower() == ".png"
    if images and not png:
        raise UsageError(f"--output {output}: {ckpt_path} is a model of images ({data}), whose samples are a PNG "
                         "grid; pass --output FILE.png")
    if png and not images:
        raise UsageError(f"--output {output}: {ckpt_path} is a model of {data}, whose samples are written as text, "
                         "one per line; pass --output FILE.txt")
    return Path(output)


def load_sampler(ckpt_path: str, device: str, guidance: float) -> tuple[Any, Any]:
    """The model (EMA weights) on ``device`` and the data module of a checkpoint, for sampling with ``guidance``."""
    from lightning_md4.modules.base import CheckpointError

    ckpt = FitCheckpoint.read(ckpt_path)
    model = ckpt.model(device)
    if guidance and not model.num_classes:
        raise CheckpointError(f"{ckpt_path} holds an unconditional model; --guidance needs a class-conditional "
                              "one (network.num_classes > 0)")
    return model, ckpt.datamodule()


def write_text_samples(texts: list[str], output: str | Path) -> Path:
    """Write one sample per line; line breaks inside a sample become ``LINE_BREAK_MARK``."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    lines = [text.replace("\r\n", "\n").replace("\n", LINE_BREAK_MARK) for text in texts]
    output.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return output


# The commands in the order ``md4 --help`` lists them after fit, validate and test.
COMMANDS: dict[str, Callable[..., None]] = {"sample": sample, "evaluate-samples": evaluate_samples,
                                            "zeroshot": zeroshot, "genppl": genppl}
