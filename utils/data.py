"""Data preparation: read conversational data in several schemas, clean it, redact PII,
remove duplicates and split it into leakage-free train/validation/test files.

The canonical schema written to ``data/processed/*.jsonl`` is::

    {"id": "...", "source": "...", "messages": [{"role": "user"|"assistant"|"system", "content": "..."}]}

Every error names the file, the line (where there is one) and what was expected.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import statistics
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import yaml
from tqdm.auto import tqdm

from . import pii
from .io import OutputDirError, write_directory_atomically
from .paths import DEFAULT_CORPUS, EVAL_DIR, PROCESSED, embedded_corpus_files, is_embedded

SPLITS = ("train", "validation", "test")
OUTPUT_FILES = tuple(f"{s}.jsonl" for s in SPLITS) + (
    "data_card.json",
    "data_card.md",
    "length_distribution.png",
)
ON_ERROR = ("raise", "skip")

# schema name -> (required keys, description shown in errors)
SCHEMAS: dict[str, tuple[tuple[str, ...], str]] = {
    "prompt_response": (("prompt", "response"), '{"prompt": str, "response": str}'),
    "context_response": (("Context", "Response"), '{"Context": str, "Response": str}'),
    "alpaca": (("instruction", "output"), '{"instruction": str, "input": str (optional), "output": str}'),
    "openai": (("messages",), '{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}'),
    "sharegpt": (("conversations",), '{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}'),
}
CHATTERBOT = "chatterbot"
_EXPECTED_SCHEMAS = "; ".join(f"{k}: {v[1]}" for k, v in SCHEMAS.items())

_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system",
}
_OPENAI_ROLES = {"user", "assistant", "system"}


@dataclass
class PrepareConfig:
    """Parameters of ``notebooks/01_data_prep.ipynb`` (its parameters cell is generated from this class)."""

    input_path: str | list = DEFAULT_CORPUS  # JSONL/YAML file, folder, list of them, or an embedded corpus
    # by name: "embedded:supportive-chat" (the project's own, see its CARD.md) or "embedded:chatterbot-corpus"
    # (the ChatterBot package's short trivia exchanges)
    output_dir: str = PROCESSED  # relative paths are taken from the repository root
    val_fraction: float = 0.1  # share of conversations in the validation split
    test_fraction: float = 0.1  # share of conversations in the test split
    seed: int = 42  # the split is deterministic for a given seed
    on_error: str = "skip"  # "skip": drop malformed rows, named (file:line) in the data card and the summary below;
    # "raise": stop at the first one. The ChatterBot corpus has one (trivia.yml:35, a string where a list belongs).
    schema: str | None = None  # None: detect per file; or one of prompt_response, context_response, alpaca,
    # openai, sharegpt, chatterbot


class DataError(ValueError):
    """Bad input data or parameters. ``str(err)`` starts with ``file:line:`` where known."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.reason = message
        where = "" if path is None else (f"{path}:{line}: " if line is not None else f"{path}: ")
        super().__init__(where + message)


class RowError(ValueError):
    """A row that cannot be converted; the caller adds file and line."""


@dataclass
class Conversation:
    messages: list[dict]
    source: str
    file: str
    line: int | None

    @property
    def first_user(self) -> str:
        return next((m["content"] for m in self.messages if m["role"] == "user"), "")


@dataclass
class ReadReport:
    """What happened while reading, for the data card."""

    rows_read: Counter = field(default_factory=Counter)  # per file
    schemas: dict = field(default_factory=dict)  # file -> schema
    skipped: list = field(default_factory=list)  # {"file", "line", "reason"}
    empty_turns_dropped: int = 0


# --------------------------------------------------------------------------- text cleaning

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff]")
_SPACES = re.compile(r"[^\S\n]+")
_NEWLINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """Unicode NFKC, no control or zero-width characters, single spaces inside lines (indentation
    kept), no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text).replace("\t", "    ")
    lines = []
    for line in text.split("\n"):
        body = line.lstrip(" ")
        # keep indentation (code in answers), collapse runs of spaces inside the line
        lines.append(" " * (len(line) - len(body)) + _SPACES.sub(" ", body).rstrip())
    return _NEWLINES.sub("\n\n", "\n".join(lines)).strip()


def near_key(text: str) -> str:
    """Case-, space- and punctuation-insensitive form of ``text`` used for near-duplicates and grouping."""
    text = "".join(ch for ch in text.casefold() if not unicodedata.category(ch).startswith(("P", "S")))
    return " ".join(text.split())


# --------------------------------------------------------------------------- schema conversion


def detect_schema(obj: dict) -> str | None:
    """Name of the schema whose required keys ``obj`` has, or None."""
    for name, (keys, _) in SCHEMAS.items():
        if all(k in obj for k in keys):
            return name
    return None


def _text(obj: dict, key: str, *, required: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise RowError(f"missing required field '{key}'")
        return ""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise RowError(f"field '{key}' is a {type(value).__name__}; expected a string")
    value = str(value)
    if required and not value.strip():
        raise RowError(f"required field '{key}' is empty")
    return value


def _turns(obj: dict, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict]:
    turns = obj.get(key)
    if not isinstance(turns, list) or not turns:
        raise RowError(f"'{key}' must be a non-empty list of {{'{role_key}', '{text_key}'}} objects")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise RowError(f"'{key}[{i}]' must be an object with '{role_key}' and '{text_key}'")
        role = roles.get(str(turn[role_key]).lower())
        if role is None:
            raise RowError(f"'{key}[{i}].{role_key}' is {turn[role_key]!r}; expected one of {sorted(set(roles))}")
        content = turn[text_key]
        if not isinstance(content, str):
            raise RowError(f"'{key}[{i}].{text_key}' is a {type(content).__name__}; expected a string")
        out.append({"role": role, "content": content})
    return out


def to_messages(obj: dict, schema: str) -> list[dict]:
    """Convert one parsed row of ``schema`` into a list of chat messages (not yet cleaned)."""
    if schema == "prompt_response":
        return [{"role": "user", "content": _text(obj, "prompt")},
                {"role": "assistant", "content": _text(obj, "response")}]
    if schema == "context_response":
        return [{"role": "user", "content": _text(obj, "Context")},
                {"role": "assistant", "content": _text(obj, "Response")}]
    if schema == "alpaca":
        instruction, extra = _text(obj, "instruction"), _text(obj, "input", required=False)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(obj, "output")}]
    if schema == "openai":
        return _turns(obj, "messages", "role", "content", {r: r for r in _OPENAI_ROLES})
    if schema == "sharegpt":
        return _turns(obj, "conversations", "from", "value", _SHAREGPT_ROLES)
    raise DataError(f"unknown schema {schema!r}; expected one of {sorted(SCHEMAS)}")


def clean_messages(messages: Sequence[dict]) -> tuple[list[dict], int]:
    """Normalise text, drop empty turns, merge consecutive turns of one speaker, keep system
    prompts first, drop leading assistant turns and a trailing unanswered user turn.

    Returns the cleaned messages and how many turns were dropped. Raises RowError when no
    user turn followed by an assistant turn remains."""
    system, chat, dropped = [], [], 0
    for m in messages:
        content = normalize_text(m["content"])
        if not content:
            dropped += 1
            continue
        if m["role"] == "system":
            system.append(content)
        elif chat and chat[-1]["role"] == m["role"]:
            chat[-1]["content"] += "\n" + content
        else:
            chat.append({"role": m["role"], "content": content})
    while chat and chat[0]["role"] == "assistant":
        chat.pop(0)
        dropped += 1
    if chat and chat[-1]["role"] == "user":
        chat.pop()
        dropped += 1
    if not chat:
        raise RowError("no user turn followed by a non-empty assistant reply")
    head = [{"role": "system", "content": "\n".join(system)}] if system else []
    return head + chat, dropped


# --------------------------------------------------------------------------- readers


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict | RowError]]:
    """Yield ``(line_number, object)`` for each non-blank line, or ``(line_number, RowError)``
    for a line that is not exactly one JSON object. Raises DataError for a missing or empty file."""
    if not path.exists():
        raise DataError("file not found; expected a JSONL file (one JSON object per line)", path)
    if path.is_dir():
        raise DataError("is a directory; expected a JSONL file (or pass the files inside it)", path)
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError("file is empty; expected one JSON object per line", path)
    decoder = json.JSONDecoder()
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            yield number, RowError(f"not valid UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1}); "
                                   "expected UTF-8 encoded JSON")
            continue
        text = text.strip().lstrip("\ufeff")
        try:
            obj, end = decoder.raw_decode(text)
        except json.JSONDecodeError as err:
            yield number, RowError(f"invalid JSON ({err.msg} at column {err.colno}); expected one JSON object per line")
            continue
        rest = text[end:].strip()
        if rest:
            what = (
                "several JSON values on one line"
                if rest[:1] in '{["'
                else f"unexpected text after the JSON object: {rest[:30]!r}"
            )
            yield number, RowError(f"{what}; expected exactly one JSON object per line")
            continue
        if not isinstance(obj, dict):
            yield (
                number,
                RowError(f"line is a JSON {type(obj).__name__}, not an object; expected one JSON object per line"),
            )
            continue
        yield number, obj


def _read_chatterbot(path: Path) -> Iterator[tuple[int, list[dict] | RowError]]:
    """Yield ``(line_number, messages)`` for each conversation of a ChatterBot YAML file."""
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text)
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise DataError(f"cannot read ChatterBot YAML ({err}); expected a UTF-8 YAML file", path) from err
    convs = None
    if isinstance(root, yaml.MappingNode):
        convs = next((v for k, v in root.value if k.value == "conversations"), None)
    if not isinstance(convs, yaml.SequenceNode):
        raise DataError("no 'conversations' list; expected a ChatterBot corpus file", path)
    for node in convs.value:
        line = node.start_mark.line + 1
        turns = yaml.safe_load(yaml.serialize(node))
        if not isinstance(turns, list) or not all(isinstance(t, (str, int, float)) for t in turns):
            yield line, RowError("conversation must be a list of strings")
            continue
        roles = ("user", "assistant")
        yield line, [{"role": roles[i % 2], "content": str(t)} for i, t in enumerate(turns)]


def resolve_inputs(input_path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expand the ``input_path`` parameter (a file, a folder, an embedded corpus or a list of those)."""
    items = [input_path] if isinstance(input_path, (str, os.PathLike)) else list(input_path)
    if not items:
        raise DataError("input_path is empty; expected a file, a folder or a list of files")
    files: list[Path] = []
    for item in items:
        if is_embedded(item):
            try:
                files.extend(embedded_corpus_files(item))
            except ValueError as err:
                raise DataError(str(err)) from None
            continue
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".yml", ".yaml"))
            if not found:
                raise DataError("folder has no .jsonl or .yml files", path)
            files.extend(found)
        else:
            files.append(path)
    return files


def read_inputs(files: Iterable[Path], schema: str | None = None, on_error: str = "raise",
                report: ReadReport | None = None) -> list[Conversation]:
    """Read and clean every file; bad rows raise (``on_error="raise"``) or are listed in
    ``report.skipped`` (``"skip"``)."""
    if on_error not in ON_ERROR:
        raise DataError(f"on_error={on_error!r}; expected one of {list(ON_ERROR)}")
    if schema is not None and schema not in SCHEMAS and schema != CHATTERBOT:
        raise DataError(
            f"schema={schema!r}; expected None (detect per file) or one of {sorted(SCHEMAS) + [CHATTERBOT]}"
        )
    report = report if report is not None else ReadReport()
    out: list[Conversation] = []

    def bad(path: Path, line: int | None, reason: str) -> None:
        if on_error == "raise":
            raise DataError(f"{reason} (on_error='skip' skips such rows and lists them in the data card)", path, line)
        report.skipped.append({"file": str(path), "line": line, "reason": reason})

    for path in tqdm(list(files), desc="reading", unit="file", leave=False):
        is_yaml = path.suffix in (".yml", ".yaml") or schema == CHATTERBOT
        if is_yaml:
            if not path.exists():
                raise DataError("file not found; expected a ChatterBot YAML file", path)
            rows: Iterable = _read_chatterbot(path)
            file_schema, source = CHATTERBOT, f"chatterbot/{path.stem}"
        else:
            rows, file_schema, source = iter_jsonl(path), schema, path.stem
        for line, row in rows:
            report.rows_read[str(path)] += 1
            if isinstance(row, RowError):
                bad(path, line, str(row))
                continue
            try:
                if not is_yaml:
                    if file_schema is None:
                        file_schema = detect_schema(row)
                        if file_schema is None:
                            raise RowError(f"unknown schema: keys {sorted(row)}; expected one of: {_EXPECTED_SCHEMAS}")
                    row = to_messages(row, file_schema)
                messages, dropped = clean_messages(row)
            except RowError as err:
                bad(path, line, str(err))
                continue
            report.empty_turns_dropped += dropped
            out.append(Conversation(messages, source, str(path), line))
        report.schemas[str(path)] = file_schema
    return out


# --------------------------------------------------------------------------- PII, dedup, split


def redact_conversations(convs: Iterable[Conversation]) -> Counter:
    """Redact PII in place; return the number of replacements by type."""
    counts: Counter = Counter()
    for conv in convs:
        for m in conv.messages:
            m["content"], _ = pii.redact(m["content"], counts)
    return counts


def deduplicate(convs: Sequence[Conversation]) -> tuple[list[Conversation], dict]:
    """Keep the first of each group of exact or near-identical conversations (role and text
    compared case-, space- and punctuation-insensitively). Returns kept rows and counts."""
    seen_exact, seen_near = set(), set()
    kept, exact, near = [], 0, 0
    by_source: Counter = Counter()
    for conv in convs:
        e = json.dumps(conv.messages, ensure_ascii=False, sort_keys=True)
        n = json.dumps([(m["role"], near_key(m["content"])) for m in conv.messages])
        if e in seen_exact:
            exact += 1
        elif n in seen_near:
            near += 1
        else:
            seen_exact.add(e)
            seen_near.add(n)
            kept.append(conv)
            continue
        by_source[conv.source] += 1
    return kept, {"exact": exact, "near": near, "total": exact + near, "by_source": dict(by_source)}


def _group_order(keys: Iterable[str], seed: int) -> list[str]:
    ordered = sorted(keys)  # sorted first: set order varies between processes
    random.Random(seed).shuffle(ordered)
    return ordered


def split_conversations(convs: Sequence[Conversation], val_fraction: float, test_fraction: float,
                        seed: int) -> dict[str, list[Conversation]]:
    """Grouped split: every conversation whose first user turn is the same (near-identically)
    goes to the same split, so no prompt is seen in training and evaluated on later."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or not 0 < value < 1:
            raise DataError(f"{name}={value!r}; expected a number strictly between 0 and 1")
    if val_fraction + test_fraction >= 1:
        raise DataError(f"val_fraction + test_fraction = {val_fraction + test_fraction:g}; expected less than 1 "
                        "so that the train split is not empty")
    groups: dict[str, list[int]] = {}
    for i, conv in enumerate(convs):
        groups.setdefault(near_key(conv.first_user), []).append(i)
    n = len(convs)
    targets = {"test": round(test_fraction * n), "validation": round(val_fraction * n)}
    for split, target in targets.items():
        if target == 0:
            param = "test_fraction" if split == "test" else "val_fraction"
            raise DataError(f"{param}={test_fraction if split == 'test' else val_fraction:g} of {n} conversations "
                            f"leaves the {split} split empty; expected at least {1 / n:.3g}")
    if len(groups) < 3:
        raise DataError(f"only {len(groups)} distinct prompts among {n} conversations; "
                        "need at least 3 to fill train, validation and test")
    assignment: dict[str, list[int]] = {s: [] for s in SPLITS}
    order = _group_order(groups, seed)
    for key in order:
        split = next((s for s in ("test", "validation") if len(assignment[s]) < targets[s]), "train")
        assignment[split].extend(groups[key])
    if not assignment["train"]:
        raise DataError(f"val_fraction={val_fraction:g} and test_fraction={test_fraction:g} leave the train split "
                        f"empty ({len(groups)} prompt groups); lower the fractions")
    return {s: [convs[i] for i in sorted(idx)] for s, idx in assignment.items()}


def conversation_id(conv: Conversation) -> str:
    return hashlib.sha1(json.dumps(conv.messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


def to_record(conv: Conversation) -> dict:
    return {"id": conversation_id(conv), "source": conv.source, "messages": conv.messages}


# --------------------------------------------------------------------------- leakage into evaluation

LEAK_MIN_WORDS = 4  # shorter evaluation texts ("Diamond.", "thanks") are too common to count as a leak


def evaluation_texts(folder: Path = EVAL_DIR) -> dict[str, tuple[str, str]]:
    """``near_key(text) -> (file, text)`` for every text of at least ``LEAK_MIN_WORDS`` words in the
    evaluation sets (every YAML under ``folder``, recursively: the domain suite, the validity ladder,
    the judge's calibration set, the safety sets): prompts, messages and replies alike."""
    found: dict[str, tuple[str, str]] = {}

    def walk(node, file: str) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value, file)
        elif isinstance(node, list):
            for value in node:
                walk(value, file)
        elif isinstance(node, str) and len(node.split()) >= LEAK_MIN_WORDS:
            found.setdefault(near_key(node), (file, node))

    for path in sorted(folder.rglob("*.y*ml")):
        try:
            walk(yaml.safe_load(path.read_text(encoding="utf-8")), str(path.relative_to(folder.parent)))
        except yaml.YAMLError as err:
            raise DataError(f"cannot read an evaluation set ({err}); expected YAML", path) from None
    return found


def evaluation_leaks(convs: Iterable[Conversation], folder: Path = EVAL_DIR) -> list[dict]:
    """The turns of ``convs`` (user or assistant) that are near-copies (``near_key``: case, spaces and
    punctuation ignored) of an evaluation text: training on them would leak the evaluation into the model."""
    texts = evaluation_texts(folder)
    leaks = []
    for conv in convs:
        for turn, m in enumerate(conv.messages):
            hit = texts.get(near_key(m["content"]))
            if hit is not None:
                leaks.append({"file": conv.file, "line": conv.line, "turn": turn, "role": m["role"],
                              "text": m["content"], "evaluation_file": hit[0], "evaluation_text": hit[1]})
    return leaks


# --------------------------------------------------------------------------- statistics, writing


def _describe(values: Sequence[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {
        "n": len(values), "min": ordered[0], "max": ordered[-1],
        "mean": round(statistics.fmean(values), 2), "median": statistics.median(values),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
    }


def length_stats(convs: Sequence[Conversation]) -> dict:
    """Words per user turn and per assistant turn, and turns per conversation."""
    words = {"user": [], "assistant": []}
    for conv in convs:
        for m in conv.messages:
            if m["role"] in words:
                words[m["role"]].append(len(m["content"].split()))
    return {
        "user_words": _describe(words["user"]),
        "assistant_words": _describe(words["assistant"]),
        "turns_per_conversation": _describe([len(c.messages) for c in convs]),
    }


def corpus_profile(convs: Sequence[Conversation]) -> dict[str, dict]:
    """Per source (a JSONL file's name: a category of the embedded corpus) and for all: conversations,
    multi-turn ones (two or more user turns), and the assistant replies' words (quartiles, p10/p90, the
    share within 30-120 words). What a corpus's data card states (``cards.corpus_table``)."""
    groups: dict[str, list[Conversation]] = {}
    for conv in convs:
        groups.setdefault(conv.source, []).append(conv)
    groups["all"] = list(convs)
    out = {}
    for name, rows in groups.items():
        words = sorted(len(m["content"].split()) for c in rows for m in c.messages if m["role"] == "assistant")
        q = statistics.quantiles(words, n=20, method="inclusive") if len(words) > 1 else words * 19
        out[name] = {"conversations": len(rows),
                     "multi_turn": sum(sum(m["role"] == "user" for m in c.messages) >= 2 for c in rows),
                     "replies": len(words), "words_p10": round(q[1]), "words_median": round(statistics.median(words)),
                     "words_p90": round(q[17]), "words_max": words[-1],
                     "within_30_120": round(sum(30 <= w <= 120 for w in words) / len(words), 3)}
    return out


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a processed split (canonical schema)."""
    rows = []
    for line, obj in iter_jsonl(Path(path)):
        if isinstance(obj, RowError):
            raise DataError(str(obj), path, line)
        rows.append(obj)
    return rows


# --------------------------------------------------------------------------- the whole stage


def prepare(input_path, output_dir, val_fraction: float = PrepareConfig.val_fraction,
            test_fraction: float = PrepareConfig.test_fraction, seed: int = PrepareConfig.seed,
            on_error: str = "raise", schema: str | None = None) -> dict:
    """Run the whole data stage and write splits, data card and figure to ``output_dir``.

    As a library call it is strict (``on_error="raise"``); the notebook's default
    (``PrepareConfig.on_error``) skips malformed rows and names them.

    Returns the data card (also written as ``data_card.json``)."""
    from . import cards, plots  # matplotlib is only needed here

    files = resolve_inputs(input_path)
    report = ReadReport()
    convs = read_inputs(files, schema=schema, on_error=on_error, report=report)
    pii_counts = redact_conversations(convs)
    kept, dup = deduplicate(convs)
    leaks = evaluation_leaks(kept)
    leaked = {(x["file"], x["line"]) for x in leaks}
    kept = [c for c in kept if (c.file, c.line) not in leaked]

    contributed = Counter(c.file for c in kept)
    empty_files = [str(f) for f in files if contributed[str(f)] == 0]
    for f in empty_files:
        reason = (f"all {report.rows_read[f]} rows were duplicates of earlier rows or could not be used; "
                  "expected at least one new conversation")
        if on_error == "raise" or len(empty_files) == len(files):
            raise DataError(reason, f)
    if not kept:
        raise DataError("no usable conversations in any input", ", ".join(map(str, files)))

    splits = split_conversations(kept, val_fraction, test_fraction, seed)
    card = {
        "schema": 1,
        "inputs": [{"file": str(f), "schema": report.schemas.get(str(f)), "rows": report.rows_read[str(f)],
                    "kept": contributed[str(f)]} for f in files],
        "parameters": {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
                       "on_error": on_error, "schema": schema},
        "counts": {s: len(rows) for s, rows in splits.items()} | {"total": len(kept)},
        "counts_by_source": {s: dict(sorted(Counter(c.source for c in rows).items())) for s, rows in splits.items()},
        "prompt_groups": {s: len({near_key(c.first_user) for c in rows}) for s, rows in splits.items()},
        "duplicates_removed": dup,
        "evaluation_leaks_removed": [{k: x[k] for k in ("file", "line", "role", "text", "evaluation_file")}
                                     for x in leaks],
        "empty_turns_dropped": report.empty_turns_dropped,
        "pii_redactions": {k: pii_counts.get(k, 0) for k in pii.PLACEHOLDERS},
        "skipped_rows": report.skipped,
        "files_without_new_rows": empty_files,
        "lengths": {s: length_stats(rows) for s, rows in splits.items()},
    }

    def write(folder: Path) -> None:
        for split, rows in splits.items():
            write_jsonl(folder / f"{split}.jsonl", (to_record(c) for c in rows))
        (folder / "data_card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (folder / "data_card.md").write_text(cards.render_data_card(card), encoding="utf-8")
        plots.plot_length_distribution(splits, folder / "length_distribution.png")

    try:
        write_directory_atomically(output_dir, write, allowed=OUTPUT_FILES)
    except OutputDirError as err:
        raise DataError(str(err)) from None
    return card


def summary(card: dict) -> str:
    """What a data preparation run showed, in a few sentences (markdown), from its data card."""
    c, d = card["counts"], card["duplicates_removed"]
    rows = sum(i["rows"] for i in card["inputs"])
    lines = [f"**{c['total']} conversations** kept from {rows} rows in {len(card['inputs'])} file(s), split "
             f"{c['train']} / {c['validation']} / {c['test']} (train / validation / test), grouped by first prompt."]
    if d["total"]:
        worst = max(d["by_source"].items(), key=lambda kv: kv[1]) if d["by_source"] else None
        lines.append(f"De-duplication removed {d['total']} ({d['exact']} exact, {d['near']} near)"
                     + (f", most of them from {worst[0]} ({worst[1]})." if worst else "."))
    leaked = card.get("evaluation_leaks_removed", [])
    if leaked:
        n = len({(x["file"], x["line"]) for x in leaked})
        lines.append(f"Removed {n} conversation(s) with a turn that is a near-copy of an evaluation text "
                     f"(first: {Path(leaked[0]['file']).name}:{leaked[0]['line']}, in {leaked[0]['evaluation_file']}).")
    redacted = {k: v for k, v in card["pii_redactions"].items() if v}
    lines.append("PII redacted: " + (", ".join(f"{v} {k}" for k, v in redacted.items()) if redacted else "none found")
                 + ".")
    if card["skipped_rows"]:
        shown = "; ".join(f"{Path(r['file']).name}:{r['line']} ({r['reason']})" for r in card["skipped_rows"][:3])
        more = len(card["skipped_rows"]) - 3
        lines.append(f"**{len(card['skipped_rows'])} malformed row(s) skipped**: {shown}"
                     + (f" and {more} more (see the data card)" if more > 0 else "") + ".")
    return " ".join(lines)
