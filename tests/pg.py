"""A throwaway PostgreSQL server for tests, started by the test session itself.

The server is ``pgserver``'s (a pip package that bundles the PostgreSQL binaries; the dev extras
install it), in a fresh temporary folder, reachable only through a Unix socket in that folder.
PostgreSQL refuses to run as root; under root ``pgserver`` runs it as a system user of its own
(``pgserver``, created with ``useradd`` on first use) and opens read/traverse permissions on the
folders above the data folder and its binaries.

The dev extras install ``pgserver`` and ``psycopg2-binary`` (wheels for CPython 3.10-3.12 on x86-64
Linux and macOS); where either is missing or cannot start a server, the tests fail with a line
naming the fix rather than being skipped: a skipped storage test would prove nothing.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest


def unavailable(reason: str) -> None:
    """Fail a test that needs a PostgreSQL server, naming why it has none."""
    pytest.fail(f"no PostgreSQL server for the RDB storage tests: {reason}")


@contextmanager
def postgres_server() -> Iterator[str]:
    """A running server for the duration of the block; yields its socket folder."""
    try:
        import psycopg2  # noqa: F401  (SQLAlchemy's default PostgreSQL driver)
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); pgserver's lock
            # file then lives in a fallback folder, which is fine for a throwaway server.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
            import pgserver
    except ImportError as err:
        unavailable(f"{err} (the dev extras install pgserver and psycopg2-binary where wheels exist: "
                    f"pip install -e '.[dev]')")
    # A short path: the socket's full path must fit in a sockaddr_un (about 100 bytes).
    root = Path(tempfile.mkdtemp(prefix="md4-pg-"))
    try:
        try:
            server = pgserver.get_server(root / "data", cleanup_mode="delete")
        except Exception as err:  # any failure to start is reported the same way
            unavailable(f"pgserver could not start a server: {type(err).__name__}: {err}")
        try:
            yield str(server.get_postmaster_info().socket_dir)
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def database_url(socket_dir: str, database: str) -> str:
    """SQLAlchemy URL of ``database`` on the server listening in ``socket_dir``."""
    return f"postgresql+psycopg2://postgres@/{database}?host={quote(socket_dir, safe='/')}"


def create_database(socket_dir: str) -> str:
    """A new, empty database on the server; returns its URL."""
    import psycopg2

    name = f"test_{uuid.uuid4().hex[:12]}"
    connection = psycopg2.connect(dbname="postgres", user="postgres", host=socket_dir)
    try:
        connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
    finally:
        connection.close()
    return database_url(socket_dir, name)
