"""Hyper-parameters of checkpoints saved before a rename or a new option, mapped to today's.

Each method knows its own history: its class's ``upgrade_hparams`` (``DiffusionModule``'s returns
the hyper-parameters unchanged; D3PM and SEDD renamed options). This file finds the method of a
checkpoint and holds the renaming helper they share.

Needed because Lightning's ``load_from_checkpoint`` silently drops keys the class does not take,
so an old uniform-state checkpoint would otherwise be built with the default, absorbing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_md4.modules.registry import get_method


def upgrade_hparams(hparams: Mapping[str, Any], cls: type | None = None) -> dict[str, Any]:
    """``hparams`` upgraded by ``cls``'s hook (default: the method its ``_class_path`` names); a
    checkpoint saved with today's names comes back equal, and so do hyper-parameters of no known method."""
    if cls is None:
        name = str(hparams.get("_class_path", "")).rsplit(".", 1)[-1]
        try:
            cls = get_method(name).cls if name else None
        except KeyError:
            cls = None
    return dict(hparams) if cls is None else cls.upgrade_hparams(dict(hparams))


def rename_options(hparams: Mapping[str, Any], renamed: Mapping[str, str],
                   values: Mapping[str, Mapping[Any, Any]] | None = None) -> dict[str, Any]:
    """``hparams`` with the keys of ``renamed`` given their new names, and the old values of
    ``values[key]`` (after the rename) replaced by the new ones."""
    upgraded = {renamed.get(key, key): value for key, value in hparams.items()}
    for key, mapping in (values or {}).items():
        if key in upgraded and isinstance(upgraded[key], str):
            upgraded[key] = mapping.get(upgraded[key], upgraded[key])
    return upgraded
