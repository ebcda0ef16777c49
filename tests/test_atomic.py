"""sct_sitehead.atomic: every file appears complete or not at all, with no temp file left, whatever fails."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from sct_sitehead.atomic import (
    move_into_place,
    staged_outputs,
    write_atomic,
    write_bytes_atomic,
    write_file_atomic,
    write_json_atomic,
    write_text_atomic,
)
from sct_sitehead.errors import OutputError


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_atomic_keeps_the_suffix_for_the_writer_and_leaves_only_the_file(tmp_path: Path) -> None:
    seen = []

    def write(tmp: Path) -> None:
        seen.append(tmp.name)
        tmp.write_bytes(b"x")

    write_atomic(tmp_path / "mask.nii.gz", write)
    assert seen[0].startswith(".mask.") and seen[0].endswith(".tmp.nii.gz")
    assert listing(tmp_path) == ["mask.nii.gz"]


def test_a_failing_writer_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "report.md"
    path.write_text("old")

    def half_then_full_disk(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputError, match="No space left on device; check free disk space"):
        write_atomic(path, half_then_full_disk)

    def interrupted(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, interrupted)
    assert path.read_text() == "old"
    assert listing(tmp_path) == ["report.md"]


def test_write_atomic_into_a_missing_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="check that the folder .*missing exists"):
        write_text_atomic("x", tmp_path / "missing" / "a.txt")


def test_text_and_json(tmp_path: Path) -> None:
    write_json_atomic({"b": 1, "a": [2]}, tmp_path / "plain.json")
    write_json_atomic({"b": 1, "a": [2]}, tmp_path / "sorted.json", sort_keys=True)
    assert (tmp_path / "plain.json").read_text() == json.dumps({"b": 1, "a": [2]}, indent=2) + "\n"
    assert (tmp_path / "sorted.json").read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'


def test_staged_outputs_appear_together_or_not_at_all(tmp_path: Path) -> None:
    with staged_outputs():
        write_text_atomic("1", tmp_path / "a.txt")
        assert not (tmp_path / "a.txt").exists()  # written, flushed, not yet renamed
        write_text_atomic("2", tmp_path / "b.txt")
    assert listing(tmp_path) == ["a.txt", "b.txt"]
    with pytest.raises(RuntimeError), staged_outputs():
        write_text_atomic("new", tmp_path / "a.txt")
        raise RuntimeError("the third file failed")
    assert (tmp_path / "a.txt").read_text() == "1"
    assert listing(tmp_path) == ["a.txt", "b.txt"]


def test_write_bytes_mode_is_set_whatever_the_umask_and_replace_false_keeps_the_file(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "private.pem"  # the folder is created
    old = os.umask(0)
    try:
        write_bytes_atomic(key, b"secret", mode=0o600)
        write_bytes_atomic(tmp_path / "public.pem", b"public")
    finally:
        os.umask(old)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "public.pem").stat().st_mode) == 0o644
    with pytest.raises(FileExistsError):
        write_bytes_atomic(key, b"other", mode=0o600, replace=False)
    assert key.read_bytes() == b"secret"
    assert listing(key.parent) == ["private.pem"]


def test_write_file_atomic_mode_none_follows_the_umask_and_errors_stay_plain_oserrors(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_file_atomic(tmp_path / "model.onnx", lambda tmp: tmp.write_bytes(b"graph"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model.onnx").stat().st_mode) == 0o640

    def failing(tmp: Path) -> None:
        raise ValueError("the exporter failed")

    with pytest.raises(ValueError, match="the exporter failed"):
        write_file_atomic(tmp_path / "model.onnx", failing)
    assert (tmp_path / "model.onnx").read_bytes() == b"graph"
    assert listing(tmp_path) == ["model.onnx"]


def test_move_into_place_files_and_folders(tmp_path: Path) -> None:
    part = tmp_path / "asset.part"
    part.write_bytes(b"verified")
    move_into_place(part, tmp_path / "assets" / "ab" / "abcd", mode=0o444)
    final = tmp_path / "assets" / "ab" / "abcd"
    assert final.read_bytes() == b"verified" and not part.exists()
    assert stat.S_IMODE(final.stat().st_mode) == 0o444

    staging, out = tmp_path / ".dataset.partial", tmp_path / "dataset"
    (staging / "sub-01").mkdir(parents=True)
    out.mkdir()  # an empty folder is replaced
    move_into_place(staging, out)
    assert listing(out) == ["sub-01"] and not staging.exists()

    other = tmp_path / ".other.partial"
    other.mkdir()
    (other / "x").write_text("x")
    with pytest.raises(OSError):
        move_into_place(other, out)  # a full folder is not
    assert listing(out) == ["sub-01"] and listing(other) == ["x"]
