"""lightning_md4.atomic: the one atomic write (checkpoints, data caches, downloads, sweep progress)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from lightning_md4 import atomic
from lightning_md4.atomic import atomic_file, atomic_path, write_atomic


def test_a_file_appears_whole_and_an_error_keeps_the_old_content(tmp_path):
    path = tmp_path / "sub" / "x.bin"
    with atomic_file(path) as f:
        f.write(b"old")
        assert not path.exists()  # nothing under the name until the block ends
    assert path.read_bytes() == b"old"
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.bin"]  # no temporary file left


def test_text_mode_and_permissions_follow_the_umask(tmp_path):
    write_atomic(tmp_path / "a.json", "{\"step\": 1}")
    assert (tmp_path / "a.json").read_text() == "{\"step\": 1}"
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "b.bin", b"\x00")
    finally:
        os.umask(old)
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_clean_stale_removes_what_killed_writes_left(tmp_path):
    stale = tmp_path / ".last.ckpt.123.abcdef12.tmp"
    stale.write_bytes(b"torn")
    other = tmp_path / ".other.ckpt.123.abcdef12.tmp"
    other.write_bytes(b"another file's write")
    with atomic_file(tmp_path / "last.ckpt", clean_stale=True) as f:
        f.write(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "last.ckpt"]


def test_a_path_for_writers_that_open_by_name(tmp_path):
    import numpy as np

    path = tmp_path / "pixels.npy"
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(2, 3))
        out[:] = 7
        out.flush()
        del out
    assert np.load(path).tolist() == [[7] * 3] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pixels.npy"]


def test_a_folder_replaces_a_stale_one_whole(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "stale.bin").write_bytes(b"stale")
    with atomic_path(cache, folder=True) as tmp:
        (tmp / "train.bin").write_bytes(b"new")
        (tmp / "meta.json").write_text("{}")
        assert (cache / "stale.bin").exists()  # the old folder stays until the new one is complete
    assert sorted(p.name for p in cache.iterdir()) == ["meta.json", "train.bin"]
    with pytest.raises(RuntimeError), atomic_path(cache, folder=True) as tmp:
        (tmp / "train.bin").write_bytes(b"half")
        raise RuntimeError("killed")
    assert (cache / "train.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_another_process_that_renamed_its_folder_first_is_reported(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_replace = os.replace

    def racing_replace(src, dst):  # the other builder's folder lands between our removal and rename
        (cache / "meta.json").parent.mkdir(exist_ok=True)
        (cache / "meta.json").write_text("{\"theirs\": 1}")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", racing_replace)
    with pytest.raises(FileExistsError), atomic_path(cache, folder=True) as tmp:
        (tmp / "meta.json").write_text("{\"ours\": 1}")
    assert (cache / "meta.json").read_text() == "{\"theirs\": 1}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_it_imports_no_torch():
    code = "import sys, lightning_md4.atomic\nassert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize("durable", [True, False])
def test_durable_decides_the_fsyncs_not_the_rename(tmp_path, monkeypatch, durable):
    synced = []
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(fd))
    target = tmp_path / "progress.json"
    atomic.write_atomic(target, "{}", durable=durable)
    assert target.read_text() == "{}" and not list(tmp_path.glob(".*.tmp"))
    assert bool(synced) == durable  # the file and its folder, or neither
