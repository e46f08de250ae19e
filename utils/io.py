"""Small file-system helpers: atomic writes, so a crash never leaves half a result behind."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Sequence


class OutputDirError(ValueError):
    pass


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is
    removed (an existing ``path`` is untouched either way)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomically(path: str | os.PathLike, obj) -> None:
    write_text_atomically(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def point_symlink(link: str | os.PathLike, target: str) -> None:
    """Make ``link`` a symlink to ``target`` (a name relative to the link's folder) in one step:
    readers see the old target or the new one, never no link."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)


def write_directory_atomically(output_dir: str | os.PathLike, write: Callable[[Path], None],
                               allowed: Sequence[str] | None = None) -> None:
    """Let ``write`` fill a temporary folder beside ``output_dir``, then swap it in.

    If ``write`` fails, ``output_dir`` is untouched. With ``allowed``, a folder holding other
    files is refused, so that swapping it out never deletes someone's files."""
    output_dir = Path(output_dir)
    if output_dir.exists():
        if not output_dir.is_dir():
            raise OutputDirError(f"{output_dir}: exists and is not a folder")
        if allowed is not None:
            foreign = sorted(p.name for p in output_dir.iterdir() if p.name not in allowed)
            if foreign:
                raise OutputDirError(f"{output_dir}: output_dir holds files this step did not write: {foreign}; "
                                     "expected an empty folder or a previous output of this step")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    old = None
    try:
        write(tmp)
        if output_dir.exists():
            old = output_dir.parent / f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(output_dir, old)
        os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not output_dir.exists():
            os.rename(old, output_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_yaml(path: str | os.PathLike, what: str, error: type[Exception] = ValueError, hint: str = ""):
    """The YAML document at ``path`` (``None`` for an empty file). A missing or unreadable file, or text
    that is not YAML, raises ``error`` naming the file, the line where the parser stopped, and ``what``
    the file should hold (e.g. "the sweep config"); ``hint`` is added to the YAML message."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {what} not found (no such file)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path}: cannot read {what} ({err})") from err
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise error(f"{path}{line}: not valid YAML ({getattr(err, 'problem', None) or err}); expected {what}"
                    + (f"; {hint}" if hint else "")) from err
