"""One place for paths: every default location is derived from the repository root,
so notebooks behave the same whether run from ``notebooks/``, by papermill or by tests."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# defaults as written in configs and notebooks (relative to ROOT, see from_root)
PROCESSED = "data/processed"
MODELS = "models"

CONFIGS_DIR = ROOT / "configs"
DATA_DIR = ROOT / "data"
RAW_DIR = DATA_DIR / "raw"
EVAL_DIR = DATA_DIR / "eval"  # every evaluation set: the domain suite, the ladder, the calibration and safety sets
PROCESSED_DIR = ROOT / PROCESSED
MODELS_DIR = ROOT / MODELS
NOTEBOOKS_DIR = ROOT / "notebooks"
REPORTS_DIR = ROOT / "reports"

# Names accepted wherever an input path is expected (``embedded:<name>``), for the corpora that come
# with a clone: "supportive-chat", the project's own conversations (data/corpus/supportive-chat/, its
# data card there: CARD.md), the default; and "chatterbot-corpus", the English ChatterBot corpus shipped
# by the PyPI package ``chatterbot-corpus`` (read from the installed package, never committed).
EMBEDDED_PREFIX = "embedded:"
SUPPORTIVE_CORPUS = "embedded:supportive-chat"
CHATTERBOT_CORPUS = "embedded:chatterbot-corpus"
DEFAULT_CORPUS = SUPPORTIVE_CORPUS
SUPPORTIVE_CORPUS_DIR = DATA_DIR / "corpus" / "supportive-chat"


def is_embedded(value) -> bool:
    """``value`` names an embedded corpus (``embedded:<name>``), not a path."""
    return isinstance(value, str) and value.startswith(EMBEDDED_PREFIX)


def embedded_corpus_files(name: str) -> list[Path]:
    """The files of the embedded corpus ``name`` (``embedded:supportive-chat`` or
    ``embedded:chatterbot-corpus``); an unknown name is refused with the known ones."""
    if name == SUPPORTIVE_CORPUS:
        files = sorted(SUPPORTIVE_CORPUS_DIR.glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"{name}: no .jsonl files in {SUPPORTIVE_CORPUS_DIR}")
        return files
    if name == CHATTERBOT_CORPUS:
        return sorted(chatterbot_corpus_dir().glob("*.yml"))
    raise ValueError(f"input_path={name!r}: unknown embedded corpus; expected "
                     f"{SUPPORTIVE_CORPUS!r} or {CHATTERBOT_CORPUS!r}, or a file or folder path")


def chatterbot_corpus_dir() -> Path:
    """Folder of the English YAML files inside the installed ``chatterbot-corpus`` package."""
    from importlib.util import find_spec

    spec = find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded corpus needs the package 'chatterbot-corpus' "
            "(pip install --no-deps chatterbot-corpus==1.3.3; `make venv` does this)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    if not folder.is_dir():
        raise FileNotFoundError(f"chatterbot-corpus is installed but {folder} is missing")
    return folder


def from_root(path: str | Path) -> Path:
    """Resolve a user-given path: absolute as given, relative against the repository root
    (so ``"data/processed"`` means the same from a notebook, papermill or the shell)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else ROOT / path


# A training run's folder: <models_dir>/<name>-lora/ holds run.json, checkpoint-N/ and final/
# (the adapter evaluation, serving and export read); the llama.cpp export goes next to them.
ADAPTER_SUFFIX = "-lora"
FINAL = "final"


def adapter_folder(name: str) -> str:
    """The run folder's name for the preset called ``name`` (a resolved preset name, not a path)."""
    return f"{name}{ADAPTER_SUFFIX}"


def adapter_root(name: str, models_dir: str | Path = MODELS) -> Path:
    """The run folder of the preset called ``name`` under ``models_dir``."""
    return from_root(models_dir) / adapter_folder(name)


def final_adapter(root: str | Path) -> Path:
    """The adapter a run keeps (``<root>/final``)."""
    return Path(root) / FINAL


def has_adapter(root: str | Path) -> bool:
    """Whether a run folder holds a finished adapter."""
    return (final_adapter(root) / "adapter_config.json").exists()


def shown(path: str | Path) -> str:
    """A path as messages and saved reports show it: relative to the repository when inside it,
    ``~/...`` when inside the home folder, else as given. ``from_root`` reads each form back, and
    no report written on one machine carries that machine's folders."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    if path.is_relative_to(ROOT):
        return str(path.relative_to(ROOT))
    home = Path.home()
    return f"~/{path.relative_to(home)}" if path != home and path.is_relative_to(home) else str(path)


class MissingInput(FileNotFoundError):
    """An input a notebook needs is not there yet: the message names the notebook to run first."""


def require(path: str | Path, notebook: str, error: type[Exception] = MissingInput) -> Path:
    """``path`` if it exists; else stop with ``error("run notebooks/<notebook> first (no <path>)")``
    (callers pass their own error class, so what they raised before is still what they raise)."""
    path = from_root(path)
    if not path.exists():
        raise error(f"run notebooks/{notebook} first (no {shown(path)})")
    return path


def input_paths(value):
    """``from_root`` for the ``input_path`` parameter: a path, an embedded corpus's name or a list."""
    if isinstance(value, (list, tuple)):
        return [input_paths(v) for v in value]
    return value if is_embedded(value) else from_root(value)
