"""car_med.files: the atomic writer every file of the library goes through, and canonical JSON."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from car_med.files import atomic_write, atomic_write_bytes, atomic_write_json, json_bytes


class _Crash(Exception):
    pass


def test_atomic_write_leaves_the_target_with_the_content(tmp_path):
    target = tmp_path / "new" / "folder" / "result.bin"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".result.bin.") and tmp.suffix == ".tmp"
        assert not target.exists()  # nothing at the name until the block ends
        tmp.write_bytes(b"content")
    assert target.read_bytes() == b"content"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.bin"]


def test_a_crash_inside_the_block_leaves_no_target_and_no_temporary_file(tmp_path):
    target = tmp_path / "result.bin"
    with pytest.raises(_Crash), atomic_write(target) as tmp:
        tmp.write_bytes(b"half of it")
        raise _Crash
    assert list(tmp_path.iterdir()) == []


def test_an_existing_target_is_replaced_only_on_success(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("old")
    with pytest.raises(_Crash), atomic_write(target) as tmp:
        tmp.write_text("new, but cut short")
        raise _Crash
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]
    with atomic_write(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # readers see the old file while the new one is written
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]


def test_a_name_based_writer_gets_its_suffix(tmp_path):
    # np.savez appends .npz to any other name, which would leave the temporary file empty
    target = tmp_path / "samples.npz"
    with atomic_write(target, suffix=".tmp.npz") as tmp:
        np.savez(tmp, x=np.arange(3))
    with np.load(target) as data:
        assert data["x"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["samples.npz"]


def test_temporary_files_can_live_in_another_folder(tmp_path):
    staging, target = tmp_path / ".incomplete", tmp_path / "case" / "image.nii.gz"
    with pytest.raises(_Crash), atomic_write(target, temp_dir=staging) as tmp:
        assert tmp.parent == staging
        tmp.write_bytes(b"x")
        raise _Crash
    assert list(staging.iterdir()) == [] and not target.parent.exists()
    with atomic_write(target, temp_dir=staging) as tmp:
        tmp.write_bytes(b"x")
    assert target.read_bytes() == b"x" and list(staging.iterdir()) == []


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    atomic_write_bytes(tmp_path / "atomic", b"")
    assert os.stat(tmp_path / "atomic").st_mode == os.stat(plain).st_mode


def test_json_is_canonical(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1.5, None]})
    assert (tmp_path / "a.json").read_bytes() == json_bytes({"a": [1.5, None], "b": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1.5, None], "b": 1}
    assert (tmp_path / "a.json").read_text().endswith("}\n")
    with pytest.raises(ValueError):
        json_bytes({"x": float("nan")})
