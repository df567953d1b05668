"""Hyper-parameters of checkpoints saved before a rename or a new option, mapped to today's."""

from __future__ import annotations

from typing import Any

# Old name -> new name. D3PM's ``kind`` and SEDD's ``graph`` became ``state_space``, SEDD's ``noise``
# (a schedule name) became ``schedule``; no other method had these keys at the top level.
RENAMED = {"kind": "state_space", "graph": "state_space", "noise": "schedule"}
STATE_SPACES = {"absorb": "absorbing"}


def upgrade_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """``hparams`` with the old names replaced and options added since filled with the value the run
    had; a checkpoint saved with today's names comes back equal.

    Needed because Lightning's ``load_from_checkpoint`` silently drops keys the class does not take,
    so an old uniform-state checkpoint would otherwise be built with the default, absorbing."""
    upgraded = {RENAMED.get(key, key): value for key, value in hparams.items()}
    if "state_space" in upgraded:
        upgraded["state_space"] = STATE_SPACES.get(upgraded["state_space"], upgraded["state_space"])
    # D3PM (the only method with a step count ``T``) saved before its ``schedule`` option ran the
    # linear schedule whatever its state space; today a uniform D3PM defaults to cosine.
    if "T" in upgraded and "schedule" not in upgraded:
        upgraded["schedule"] = "linear"
    return upgraded
