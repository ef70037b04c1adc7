"""Atomic writes: an output is complete or absent; existing directories are refused unless forced."""
from __future__ import annotations

import json

import pytest

from sparsify._io import atomic_dir, atomic_path, write_json
from sparsify.errors import RunDirError, SparsifyError


def _leftovers(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def test_atomic_path_writes_on_success(tmp_path):
    target = tmp_path / "a.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("done")
        assert not target.exists()  # invisible until the block completes
    assert target.read_text() == "done"
    assert _leftovers(tmp_path) == []


def test_atomic_path_leaves_no_file_when_block_raises(tmp_path):
    target = tmp_path / "a.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_failure_keeps_previous_content(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_path_missing_directory_is_clear_error(tmp_path):
    with pytest.raises(SparsifyError, match="does not exist"):
        with atomic_path(tmp_path / "nope" / "a.txt"):
            pass


def test_write_json(tmp_path):
    write_json(tmp_path / "x.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2]}
    assert _leftovers(tmp_path) == []


def test_atomic_dir_creates_on_success(tmp_path):
    out = tmp_path / "sub" / "run"
    with atomic_dir(out) as tmp:
        assert tmp != out and not out.exists()
        (tmp / "f").write_text("x")
    assert (out / "f").read_text() == "x"
    assert _leftovers(out.parent) == []


def test_atomic_dir_refuses_non_empty_without_force(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep").write_text("user")
    entered = False
    with pytest.raises(RunDirError, match="--force"):
        with atomic_dir(out):
            entered = True
    assert not entered
    assert (out / "keep").read_text() == "user"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_accepts_empty_existing_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("x")
    assert [p.name for p in out.iterdir()] == ["f"]


def test_atomic_dir_refuses_a_file(tmp_path):
    out = tmp_path / "run"
    out.write_text("not a dir")
    with pytest.raises(RunDirError):
        with atomic_dir(out, force=True):
            pass
    assert out.read_text() == "not a dir"


def test_atomic_dir_force_replaces(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old").write_text("old")
    (out / "nested").mkdir()
    with atomic_dir(out, force=True) as tmp:
        (tmp / "new").write_text("new")
        assert (out / "old").exists()  # the old content stays until the new one is complete
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("force, existing", [(False, False), (True, False), (True, True)])
def test_atomic_dir_leaves_nothing_on_failure(tmp_path, force, existing):
    out = tmp_path / "run"
    if existing:
        out.mkdir()
        (out / "old").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(out, force=force) as tmp:
            (tmp / "partial").write_text("half")
            raise ValueError("fail")
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["old"]
    else:
        assert not out.exists()
    assert _leftovers(tmp_path) == []
