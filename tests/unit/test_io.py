"""Atomic writes: a failure never leaves half a result behind and never loses what was there."""
import os

import pytest

from utils import io


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "r.json"
    io.write_json_atomically(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'
    with pytest.raises(RuntimeError), io.atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert path.read_text() == '{\n  "a": 1\n}\n' and os.listdir(path.parent) == ["r.json"]


def test_a_failed_folder_write_keeps_the_old_folder_and_a_foreign_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    io.write_directory_atomically(out, lambda d: (d / "x.txt").write_text("one"), allowed=["x.txt"])

    def crash(d):
        (d / "x.txt").write_text("two")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.write_directory_atomically(out, crash, allowed=["x.txt"])
    assert (out / "x.txt").read_text() == "one" and sorted(os.listdir(tmp_path)) == ["out"]
    io.write_directory_atomically(out, lambda d: (d / "x.txt").write_text("three"), allowed=["x.txt"])
    assert (out / "x.txt").read_text() == "three" and sorted(os.listdir(tmp_path)) == ["out"]
    (out / "mine.txt").write_text("someone's")
    with pytest.raises(io.OutputDirError, match=r"holds files this step did not write: \['mine.txt'\]"):
        io.write_directory_atomically(out, lambda d: None, allowed=["x.txt"])
    assert (out / "mine.txt").read_text() == "someone's"
    (tmp_path / "file").write_text("")
    with pytest.raises(io.OutputDirError, match="exists and is not a folder"):
        io.write_directory_atomically(tmp_path / "file", lambda d: None)


def test_the_symlink_is_replaced_not_removed_first(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    io.point_symlink(tmp_path / "latest", "a")
    io.point_symlink(tmp_path / "latest", "b")
    assert os.readlink(tmp_path / "latest") == "b" and sorted(os.listdir(tmp_path)) == ["a", "b", "latest"]
