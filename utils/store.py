"""Results kept by content: a small SQLite table of JSON values under a key that hashes
everything the value depends on (for the judge: its weights, dtype, prompts, the grading code,
the question, the reply). A rerun in which one model changed pays only for that model's replies.

A damaged entry (its text no longer matches the digest stored beside it, it is not JSON, or it
fails the caller's check) is named in the log, removed and computed again: it never crashes a run
or feeds a wrong value. A file that is not an SQLite database at all is moved aside (``.damaged``)
and a new one started.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Callable

from .paths import shown


class ContentStore:
    """``get_or_compute(kind, parts, compute, check)``: the value kept under ``(namespace, kind,
    parts)``, or ``compute()`` (then kept). ``path=None`` keeps values in memory only (for weights
    that are not known by their content). ``hits``/``misses`` count per kind."""

    def __init__(self, path: Path | None, namespace: str, log: Callable[[str], None] = print):
        self.path, self.namespace, self.log = (Path(path) if path else None), namespace, log
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}
        self._memory: dict[str, str] = {}
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    # ------------------------------------------------------------------ storage

    def _open(self) -> sqlite3.Connection | None:
        if self.path is None:
            return None
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for attempt in (0, 1):
                try:
                    conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
                    conn.execute("CREATE TABLE IF NOT EXISTS kept (key TEXT PRIMARY KEY, kind TEXT NOT NULL, "
                                 "digest TEXT NOT NULL, value TEXT NOT NULL)")
                    conn.commit()
                    self._conn = conn
                    break
                except sqlite3.DatabaseError as err:
                    if attempt:
                        raise
                    aside = self.path.with_name(self.path.name + ".damaged")
                    self.log(f"{shown(self.path)}: not a readable cache ({err}); moved to {aside.name}, starting "
                             "a new one")
                    self.path.replace(aside)
        return self._conn

    def key(self, kind: str, parts) -> str:
        return hashlib.sha256(json.dumps([self.namespace, kind, parts], ensure_ascii=False).encode()).hexdigest()

    def _read(self, key: str) -> tuple[str, str] | None:
        conn = self._open()
        if conn is None:
            text = self._memory.get(key)
            return None if text is None else (_digest(text), text)
        row = conn.execute("SELECT digest, value FROM kept WHERE key = ?", (key,)).fetchone()
        return None if row is None else (row[0], row[1])

    def _write(self, key: str, kind: str, text: str) -> None:
        conn = self._open()
        if conn is None:
            self._memory[key] = text
            return
        conn.execute("INSERT OR REPLACE INTO kept (key, kind, digest, value) VALUES (?, ?, ?, ?)",
                     (key, kind, _digest(text), text))
        conn.commit()

    # ------------------------------------------------------------------ use

    def get(self, kind: str, parts, check: Callable[[object], bool] = lambda v: True):
        """The kept value, or None (nothing kept, or the entry was damaged: then it is logged and removed)."""
        key = self.key(kind, parts)
        with self._lock:
            found = self._read(key)
            if found is None:
                return None
            digest, text = found
            try:
                if digest != _digest(text):
                    raise ValueError("its text does not match its digest")
                value = json.loads(text)
                if not check(value):
                    raise ValueError(f"the value {text[:80]!r} is not a valid {kind}")
            except ValueError as err:
                self.log(f"{shown(self.path) if self.path else 'judge cache'}: damaged {kind} entry {key[:12]} "
                         f"ignored ({err}); computing it again")
                self._forget(key)
                return None
            self.hits[kind] = self.hits.get(kind, 0) + 1
            return value

    def _forget(self, key: str) -> None:
        conn = self._open()
        if conn is None:
            self._memory.pop(key, None)
        else:
            conn.execute("DELETE FROM kept WHERE key = ?", (key,))
            conn.commit()

    def put(self, kind: str, parts, value) -> None:
        """Keep ``value`` (just computed: counted as such) under ``(kind, parts)``."""
        text = json.dumps(value, ensure_ascii=False)
        with self._lock:
            self._write(self.key(kind, parts), kind, text)
            self.misses[kind] = self.misses.get(kind, 0) + 1

    def get_or_compute(self, kind: str, parts, compute: Callable[[], object],
                       check: Callable[[object], bool] = lambda v: True):
        value = self.get(kind, parts, check)
        if value is None:
            value = compute()
            self.put(kind, parts, value)
        return value

    def counts(self) -> dict:
        kinds = sorted(set(self.hits) | set(self.misses))
        return {k: {"kept": self.hits.get(k, 0), "computed": self.misses.get(k, 0)} for k in kinds}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def code_key(path: Path) -> bytes:
    """What a Python file computes, for cache keys: its syntax tree without comments and
    docstrings (a module's, class's or function's leading string)."""
    return source_key(Path(path).read_text(encoding="utf-8"))


def source_key(source: str) -> bytes:
    """``code_key`` of Python source text (a whole file, or one function or class)."""
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(source))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree).encode()


def objects_key(*objects) -> str:
    """A digest of what these functions and classes compute (``source_key`` of each one's source)."""
    import inspect

    return hashlib.sha256(b"\0".join(source_key(inspect.getsource(o)) for o in objects)).hexdigest()[:16]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
