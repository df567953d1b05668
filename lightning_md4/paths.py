"""Why a path given where a file is expected cannot be read, in the words every error of ``md4`` uses.

Torch-free: the command line checks its files before it imports torch (:mod:`lightning_md4.preflight`).
"""

from __future__ import annotations

from pathlib import Path


def not_a_file(path: str | Path) -> str:
    """What is wrong with ``path``, which is not a regular file: ``is a directory, not a file`` or
    ``does not exist``, for messages such as ``f"checkpoint {path} {not_a_file(path)}"``."""
    return "is a directory, not a file" if Path(path).expanduser().is_dir() else "does not exist"
