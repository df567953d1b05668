"""Loading a checkpoint of ``md4 fit`` for scoring and sampling: the one place every command reads
one, resolves its model and data module classes, and picks the device and precision.

(Writing checkpoints durably and falling back to an older one on resume is
:mod:`lightning_md4.checkpointing`.) torch and Lightning are imported inside the functions: the
command line imports this module before it knows whether it needs them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_md4.paths import not_a_file


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint, turning every way it can be broken into a clear ``CheckpointError``."""
    import torch

    from lightning_md4.modules.base import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} {not_a_file(path)}; pass --ckpt_path with a .ckpt file of a fit run")
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


def default_device() -> str:
    """``cuda`` when there is a GPU, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_precision() -> str:
    """The Trainer precision that ``precision: null`` stands for: bf16 autocast on a GPU, float32 on the CPU."""
    return "bf16-mixed" if default_device() == "cuda" else "32-true"


@dataclass(frozen=True)
class FitCheckpoint:
    """A checkpoint written by ``md4 fit``, read and checked: its model and data module on demand."""

    path: Path
    contents: dict[str, Any]

    @classmethod
    def read(cls, path: str | Path) -> FitCheckpoint:
        return cls(Path(path), load_checkpoint(path))

    def model(self, device: str) -> Any:
        """The ``DiffusionModule`` of the checkpoint, with its EMA weights, on ``device``."""
        from lightning_md4.modules.base import DiffusionModule
        from lightning_md4.modules.legacy import upgrade_hparams

        hparams = self.contents["hyper_parameters"]
        model_cls = resolve_class(hparams["_class_path"], DiffusionModule)
        # Checkpoints saved under old hyper-parameter names load as what they were (see upgrade_hparams).
        return model_cls.load_from_checkpoint(self.path, map_location=device, **upgrade_hparams(hparams))

    def datamodule(self) -> Any:
        """The ``TokenDataModule`` the model was trained on (it decodes samples and holds the references)."""
        from datamodules.base import TokenDataModule

        data_cls = resolve_class(self.data_hparams.get("_class_path", ""), TokenDataModule)
        return data_cls.load_from_checkpoint(self.path)

    @property
    def data_hparams(self) -> dict[str, Any]:
        return self.contents.get("datamodule_hyper_parameters", {})

    @property
    def tokenizer(self) -> str:
        """The tokenizer the checkpoint's data module used (``gpt2`` if it names none)."""
        return self.data_hparams.get("tokenizer", "gpt2")
