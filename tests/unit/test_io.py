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


def test_read_yaml_names_the_file_the_line_and_what_was_expected(tmp_path):
    from utils.io import read_yaml

    class MyError(ValueError):
        pass

    good = tmp_path / "good.yaml"
    good.write_text("a: 1\nb: [x, y]\n")
    assert read_yaml(good, "a config") == {"a": 1, "b": ["x", "y"]}
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "empty.yaml", "a config") is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [x, y\nc: 3\n")
    with pytest.raises(MyError, match=r"bad.yaml line \d+: not valid YAML .*expected a config; quote it"):
        read_yaml(bad, "a config", MyError, hint="quote it")
    with pytest.raises(MyError, match="missing.yaml: a config not found"):
        read_yaml(tmp_path / "missing.yaml", "a config", MyError)
    (tmp_path / "latin1.yaml").write_bytes("a: caf\xe9\n".encode("latin-1"))
    with pytest.raises(MyError, match="latin1.yaml: cannot read a config"):
        read_yaml(tmp_path / "latin1.yaml", "a config", MyError)
    assert bad.read_text() == "a: 1\nb: [x, y\nc: 3\n"  # nothing written
