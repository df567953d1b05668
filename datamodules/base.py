"""Shared pieces of the data modules: the base class, token data sets and an eval sampler.

Every data set item is ``{"x0": LongTensor[seq_len], "index": int}``; the default collate turns a
batch into ``{"x0": [batch, seq_len], "index": [batch]}``. ``index`` is the example's position in
its split, which the evaluation noise is keyed on, so it must be stable across runs and devices.

Tokens are ``0..vocab_size-1``; the model uses ``vocab_size`` as its mask id, and the rendering
hooks (:meth:`TokenDataModule.decode`, :meth:`TokenDataModule.to_images`) show any id
``>= vocab_size`` as a mask.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

Item = dict[str, Any]


class DataError(ValueError):
    """A data file is missing, corrupt or not what the data module expects, or a data setting is invalid."""


DEFAULT_BATCH_SIZE = 64  # per device, when neither batch_size nor global_batch_size is set


def per_device_batch(global_batch_size: int, num_nodes: int, devices: int, accumulate_grad_batches: int) -> int:
    """The per-device batch that makes ``global_batch_size`` over all nodes, devices and accumulated steps.

    Raises:
        DataError: the global batch does not divide exactly.
    """
    shards = num_nodes * devices * accumulate_grad_batches
    if global_batch_size % shards:
        raise DataError(
            f"data.init_args.global_batch_size {global_batch_size} does not divide over {num_nodes} node(s) x "
            f"{devices} device(s) x {accumulate_grad_batches} accumulated batch(es) = {shards}; use a multiple of "
            f"{shards} or change trainer.num_nodes, trainer.devices or trainer.accumulate_grad_batches")
    return global_batch_size // shards


class UnrepeatedDistributedSampler(DistributedSampler):
    """Rank ``r`` of ``R`` gets indices ``r, r + R, r + 2R, ...``: every example exactly once.

    Lightning shards evaluation data with a plain ``DistributedSampler``, which pads the shards to
    equal length by repeating examples, so a few examples would count twice in a validation metric.
    Lightning's own unrepeated sampler is a private internal, hence this small one. Subclassing
    ``DistributedSampler`` tells Lightning the loader is already sharded, so it leaves it alone.

    Shards differ in length by at most one example, so ranks may run one batch more or fewer:
    aggregate metrics at epoch end (e.g. torchmetrics), not with per-step collectives.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        # The parent sized the shards with padding; undo that.
        self.total_size = len(dataset)
        self.num_samples = len(range(rank, self.total_size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


# -- resumable training order ---------------------------------------------------------------------
def draw_seed() -> int:
    """A seed from torch's global RNG, drawn as ``RandomSampler`` draws its epoch's seed."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


def rng_state() -> dict[str, Any]:
    """The global RNG states of this process (torch, this process's CUDA device, numpy, Python) as
    types that ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                                       int(has_gauss), float(cached))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class ResumableSampler(DistributedSampler):
    """The shuffled training order of rank ``rank`` of ``num_replicas`` (one process: 1 and 0).

    Each epoch draws one seed from torch's global RNG, exactly as ``RandomSampler`` does (so one
    process sees the order it always did), and shuffles the training set with it. The global
    batches are consecutive blocks of ``world * batch_size`` examples of that permutation; rank
    ``r`` takes block part ``r``, so its ``k``-th batch is ``perm[(k * world + r) * B : ... + B]``.
    With gradient accumulation, consecutive batches of a rank are the micro-batches of a step, and
    the examples of every optimiser step are the same on any layout with the same global batch
    (which is what ``train_noise``'s strata, ``(micro_index * world + rank) * B`` onwards, assume).
    The incomplete last global batch is dropped.

    Every rank draws the same seed because ``seed_everything`` seeds every rank alike and the ranks
    draw from the global RNG alike (same shapes, same steps); nothing here communicates.

    A ``DistributedSampler``, also on one process, so that a parallel strategy (DDP, FSDP) leaves
    the loader alone; ``set_epoch`` is ignored (the epoch's seed comes from the global RNG).
    :meth:`resume` makes the next iteration continue an epoch at a batch with its recorded seed.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, drop_last=True)
        self.size, self.block, self.world, self.part = len(dataset), batch_size, num_replicas, rank
        self.batches = self.size // (num_replicas * batch_size)  # per rank, per epoch
        self.seed: int | None = None  # the current epoch's seed, once its iteration has started
        self._resume_at: tuple[int, int] | None = None

    def resume(self, seed: int, batch: int) -> None:
        """The next iteration continues the epoch shuffled with ``seed`` from its batch ``batch``."""
        self._resume_at = (seed, batch)

    def __iter__(self) -> Iterator[int]:
        if self._resume_at is not None:
            (self.seed, start), self._resume_at = self._resume_at, None
        else:
            self.seed, start = draw_seed(), 0
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed))
        B, W, r = self.block, self.world, self.part
        for k in range(start, self.batches):
            yield from order[(k * W + r) * B:(k * W + r + 1) * B].tolist()

    def __len__(self) -> int:
        return self.batches * self.block


class ResumableLoader(DataLoader):
    """The training loader, whose place in the epoch :class:`TokenDataModule` keeps in checkpoints
    (its own part: the one route that works whether the loader is made before the checkpoint is
    restored, as ``trainer.estimated_stepping_batches`` does when ``max_epochs`` is set, or after).
    Without it, a run resumed mid-epoch shuffled the epoch anew from a reseeded RNG and trained on
    other examples than the uninterrupted run would have. (The methods are not named
    ``state_dict``/``load_state_dict``: Lightning would save a second copy through its fit loop.)

    The place is the epoch's seed, the examples consumed in it (counted over all ranks, so a run
    may resume on another layout with the same global batch), and the global RNG states at the
    save (dropout, label dropout and random crops draw from them). The resumed iteration restores
    them just before it fetches its first batch, where the uninterrupted run went on from the same
    state (mid-epoch; a resumed iteration that starts a new epoch restores them before it makes its
    loader iterator, which draws from them as the uninterrupted run's did). Ranks' RNGs are in step
    (see :class:`ResumableSampler`), so rank 0's, the one in the checkpoint, serves all. Random
    crops drawn in worker processes (``num_workers > 0``) are not restored.
    """

    STATE_VERSION = 1

    def __iter__(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        self._iterated = True
        restore, self._restore = getattr(self, "_restore", None), None
        done = 0
        if restore is not None:
            if restore["batch"] < sampler.batches:  # else saved at the end of an epoch: this one is new
                sampler.resume(restore["seed"], restore["batch"])
                done = restore["batch"]
            # A new epoch draws the loader iterator's base seed and (at once with workers) the
            # epoch's seed from here on, as the uninterrupted run did after the save.
            set_rng_state(restore["rng"])
        inner = super().__iter__()  # a plain DataLoader's iterator, which draws its base seed here
        return self._counted(inner, done, restore["rng"] if restore is not None and done else None)

    def _counted(self, inner: Iterator[Any], done: int, rng: dict[str, Any] | None) -> Iterator[Any]:
        self._done = done
        if rng is not None:  # mid-epoch: the uninterrupted run made no iterator here, so undo its draw
            set_rng_state(rng)
        for batch in inner:
            self._done += 1
            yield batch

    @property
    def iterated(self) -> bool:
        """Whether an iterator of this loader has been made (a place restored now would come late)."""
        return getattr(self, "_iterated", False)

    def place(self) -> dict[str, Any]:
        """Where the loader is in its epoch, for a checkpoint; ``{}`` before it is iterated."""
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        if sampler.seed is None:  # not iterated yet
            return {}
        return {"version": self.STATE_VERSION, "seed": sampler.seed, "examples": self._done * sampler.world * sampler.block,
                "global_batch": sampler.world * sampler.block, "rng": rng_state()}

    def resume_from(self, state: dict[str, Any]) -> None:
        """Continue, at the next iteration, from a ``place`` of a checkpoint."""
        if not state:
            return
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        global_batch = sampler.world * sampler.block
        if state.get("version") != self.STATE_VERSION or state["examples"] % global_batch:
            rank_zero_warn(
                f"the checkpoint's place in its epoch ({state.get('examples')} examples in global batches of "
                f"{state.get('global_batch')}) does not fit this run's global batch of {global_batch}; the epoch "
                "is shuffled anew, so the resumed run trains on other examples than the interrupted one would have")
            return
        self._restore = {"seed": state["seed"], "batch": state["examples"] // global_batch, "rng": state["rng"]}


class LazyMemmap:
    """Rows ``[start, stop)`` of an array file, memory-mapped on first access.

    A ``.npy`` file (``dtype=None``) carries its dtype and shape. A raw file is read as a 1-D
    ``dtype`` array: a streamed token cache (:mod:`datamodules.packing`) learns its length only at
    the end, so it writes raw arrays that its ``meta.json`` describes.

    Pickling a ``np.memmap`` copies its whole content, which would ship the data to every
    spawned worker; this object pickles as just a path and reopens the map in each process.
    """

    def __init__(self, path: Path, start: int, stop: int, dtype: str | None = None) -> None:
        self.path, self.start, self.stop, self.dtype = path, start, stop, dtype
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key: slice) -> np.ndarray:
        if self._array is None:
            if self.dtype is None:
                self._array = np.load(self.path, mmap_mode="r")[self.start : self.stop]
            else:
                self._array = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(len(self),),
                                        offset=self.start * np.dtype(self.dtype).itemsize)
        return self._array[key]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}


class TokenRows(Dataset):
    """Fixed examples: row ``i`` of a ``[num_examples, seq_len]`` integer tensor."""

    def __init__(self, rows: Tensor) -> None:
        self.rows = rows.long()

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, index: int) -> Item:
        return {"x0": self.rows[index], "index": index}


class TokenChunks(Dataset):
    """Consecutive non-overlapping ``seq_len`` chunks of a token stream; the remainder is dropped."""

    def __init__(self, tokens: np.ndarray | LazyMemmap, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, index: int) -> Item:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.seq_len
        return {"x0": _to_long(self.tokens[start : start + self.seq_len]), "index": index}


class TokenCrops(TokenChunks):
    """Random ``seq_len`` crops of a token stream, one per chunk's worth of tokens.

    The offset comes from torch's global RNG, which Lightning seeds per worker, so crops differ
    between workers and epochs but are reproducible under ``seed_everything(workers=True)``.
    """

    def __getitem__(self, index: int) -> Item:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = int(torch.randint(len(self.tokens) - self.seq_len + 1, ()))
        return {"x0": _to_long(self.tokens[start : start + self.seq_len]), "index": index}


def _to_long(tokens: np.ndarray) -> Tensor:
    """A copy of a (possibly memory-mapped, unsigned) token slice as ``LongTensor[seq_len]``."""
    return torch.from_numpy(np.array(tokens, dtype=np.int64))


def decode_chars(tokens: Tensor, alphabet: str, mask_char: str) -> list[str]:
    """Strings for ``tokens`` ``[batch, seq]``, token ``k`` being ``alphabet[k]``.

    Ids ``>= len(alphabet)`` (the mask) become ``mask_char``.
    """
    table = np.array([*alphabet, mask_char])
    ids = tokens.detach().cpu().clamp(max=len(alphabet)).numpy()
    return ["".join(row) for row in table[ids]]


class TokenDataModule(pl.LightningDataModule):
    """Base for data modules yielding fixed-length integer token batches.

    Subclasses call ``save_hyperparameters()`` (so a checkpoint's ``datamodule_hyper_parameters``
    rebuild them), make :attr:`vocab_size` and :attr:`seq_len` available right after ``__init__``
    (the CLI links them into the model before any data is loaded), and implement :meth:`_build`.

    The training batch is set either per device (``batch_size``) or for the whole run
    (``global_batch_size``, which stays fixed as nodes, devices or gradient accumulation change):
    at ``setup`` the per-device batch becomes ``global_batch_size / (num_nodes * devices *
    accumulate_grad_batches)``, which must divide exactly. Setting both is allowed only when
    they agree; setting neither means :data:`DEFAULT_BATCH_SIZE` per device.

    Validation is limited with ``val_examples``, not with ``trainer.limit_val_batches``: Lightning's
    limit counts batches per rank, so the examples it keeps change with the number of devices,
    nodes and the batch size (which ``global_batch_size`` ties to accumulation), and so does the
    validation NELBO. ``val_examples`` keeps the first K examples of the split on any layout; the
    evaluation noise is keyed by example index, so the number is then the same on any layout.

    Args:
        batch_size: training batch size per device.
        eval_batch_size: validation/test batch size per device; ``None`` means the per-device
            training batch.
        num_workers: data loader worker processes.
        global_batch_size: training batch summed over all devices, nodes and accumulated steps.
        val_examples: validate on the first ``val_examples`` examples of the validation split
            (all of them when the split is smaller); ``None`` means the whole split.
    """

    def __init__(
        self,
        batch_size: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        global_batch_size: int | None = None,
        val_examples: int | None = None,
    ) -> None:
        super().__init__()
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                           ("global_batch_size", global_batch_size), ("val_examples", val_examples)):
            if value is not None and value < 1:
                raise DataError(f"data.init_args.{key} is {value}; it must be a positive integer")
        self.requested_batch_size = batch_size
        self.global_batch_size = global_batch_size
        self.requested_eval_batch_size = eval_batch_size
        self.batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
        self.eval_batch_size = self.batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = num_workers
        self.val_examples = val_examples
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._train_loader: ResumableLoader | None = None  # the newest, whose place a checkpoint keeps
        self._train_loader_state: dict[str, Any] | None = None  # from the checkpoint, for the next one

    @property
    def vocab_size(self) -> int:
        """Number of real tokens ``V``; the model's mask id is ``V``."""
        raise NotImplementedError

    @property
    def seq_len(self) -> int:
        """Tokens per example."""
        raise NotImplementedError

    def _build(self) -> None:
        """Set ``train_set``, ``val_set`` and ``test_set``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        self._split_global_batch()
        if stage in ("fit", "validate"):
            self._warn_on_batch_limit()
        # All splits are cheap to build (small or memory-mapped), so build them once for any stage.
        if self.train_set is None:
            self._build()

    def _split_global_batch(self) -> None:
        """Set the per-device batch from ``global_batch_size`` and the trainer's layout."""
        if self.global_batch_size is None:
            return
        if self.trainer is not None:
            nodes, devices = self.trainer.num_nodes, self.trainer.num_devices
            accumulate = self.trainer.accumulate_grad_batches
        else:
            nodes, (devices, _), accumulate = 1, self._world(), 1
        self.batch_size = per_device_batch(self.global_batch_size, nodes, devices, accumulate)
        if self.requested_batch_size is not None and self.requested_batch_size != self.batch_size:
            raise DataError(
                f"data.init_args.batch_size {self.requested_batch_size} (per device) disagrees with "
                f"data.init_args.global_batch_size {self.global_batch_size}, which gives {self.batch_size} per device "
                f"on {nodes} node(s) x {devices} device(s) x {accumulate} accumulated batch(es); set one of them to null")
        if self.requested_eval_batch_size is None:
            self.eval_batch_size = self.batch_size

    def _warn_on_batch_limit(self) -> None:
        """Say when ``trainer.limit_val_batches`` makes the validation subset depend on the layout."""
        limit = None if self.trainer is None else self.trainer.limit_val_batches
        # Lightning stores "no limit" as the fraction 1.0 and "no validation" as 0; neither picks a subset.
        if limit is None or limit == 0 or (isinstance(limit, float) and limit == 1.0):
            return
        rank_zero_warn(
            f"trainer.limit_val_batches={limit} limits batches per rank, so the validation examples (and "
            f"val/nelbo) change with devices, nodes, accumulation and batch size; set "
            f"data.init_args.val_examples (now {self.val_examples}) and trainer.limit_val_batches=null instead")

    def train_dataloader(self) -> DataLoader:
        """Shuffled, the incomplete last global batch dropped, resumable mid-epoch (:class:`ResumableLoader`)."""
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        world_size, rank = self._world()
        sampler = ResumableSampler(self.train_set, self.batch_size, world_size, rank)
        loader = self._loader(self.train_set, self.batch_size, drop_last=True, sampler=sampler,
                              loader_class=ResumableLoader)
        if self._train_loader_state:
            loader.resume_from(self._train_loader_state)
            self._train_loader_state = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """The training loader's place in its epoch (see :class:`ResumableLoader`), for checkpoints."""
        state = self._train_loader.place() if self._train_loader is not None else {}
        return {"train_loader": state} if state else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's training loader state for the loader that ``train_dataloader`` makes next."""
        self._train_loader_state = state_dict.get("train_loader") or None
        loader = self._train_loader
        if not self._train_loader_state or loader is None:
            return
        if loader.iterated:  # strategies that restore after the fit loop made its iterator (FSDP, DeepSpeed)
            rank_zero_warn("the checkpoint's place in its epoch arrived after the training loader was iterated; "
                           "the resumed run shuffles its epoch anew (not exactly the interrupted run)")
            return
        loader.resume_from(self._train_loader_state)  # made, not yet iterated (max_epochs): resume it

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self._first(self.val_set, self.val_examples))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def decode(self, tokens: Tensor) -> list[str] | None:
        """Text for ``tokens`` ``[batch, seq]``, masks shown visibly; ``None`` if not text."""
        return None

    def to_images(self, tokens: Tensor) -> Tensor | None:
        """Images ``[batch, C, H, W]`` in ``[0, 1]`` for ``tokens`` ``[batch, seq]``; ``None`` if not images."""
        return None

    @staticmethod
    def _first(dataset: Dataset | None, count: int | None) -> Dataset | None:
        """The first ``count`` examples of ``dataset`` (all when ``None`` or more than it holds).

        Items keep their ``index`` in the whole split, which is what the evaluation noise is keyed on.
        """
        if dataset is None or count is None or count >= len(dataset):
            return dataset
        return Subset(dataset, range(count))

    def _eval_loader(self, dataset: Dataset | None) -> DataLoader:
        """An unshuffled loader that, under DDP, gives each example to exactly one rank."""
        world_size, rank = self._world()
        sampler = UnrepeatedDistributedSampler(dataset, world_size, rank) if world_size > 1 else None
        return self._loader(dataset, self.eval_batch_size, shuffle=False, drop_last=False, sampler=sampler)

    def _world(self) -> tuple[int, int]:
        """``(world_size, rank)`` from the attached trainer, else from torch.distributed, else ``(1, 0)``."""
        if self.trainer is not None:
            return self.trainer.world_size, self.trainer.global_rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def _loader(self, dataset: Dataset | None, batch_size: int, loader_class: type[DataLoader] = DataLoader,
                **kwargs: Any) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        return loader_class(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )
