"""Keeping the fits current: which default second stages no longer match the shipped ones
(``stale_shipped``), whether this machine has everything fitted (``fitted``), writing a second stage
fitted here to ``SHIPPED_FIT`` (``ship``), and removing the cached fits of earlier versions (``prune``)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..paths import shown
from ..safety_screen import Screen
from .cascade import _Cascade, _stage_key
from .fitcache import SHIPPED_FIT, _cache_folder, _read_stage, _stage_digest, _write_aside
from .labelled import CRISIS_SETS, REPLY_SETS, _train_rows
from .probe import _screen_setting

def stale_shipped(keys: dict[str, dict] | None = None) -> dict[str, list[str]]:
    """For each default cascade whose shipped second stage does not match the current data and code:
    which parts of its key moved (``rows``, ``code``, ``screen``, ``settings``; ``missing``)."""
    keys = keys if keys is not None else current_stage_keys()
    out = {}
    for name, key in keys.items():
        path = SHIPPED_FIT / f"{name}.json"
        if not path.is_file():
            out[name] = ["missing"]
            continue
        shipped = _read_stage(path)["key"]
        moved = [part for part in key if shipped.get(part) != key[part]]
        if moved:
            out[name] = moved
    return out


def current_stage_keys() -> dict[str, dict]:
    """The second-stage keys of the default detector and output filter (this data, code and screen)."""
    screens = {"crisis": Screen("crisis"), "replies": Screen("replies")}
    return {"crisis": _stage_key("crisis", _train_rows(CRISIS_SETS, "positive"), screens["crisis"]),
            "replies": _stage_key("replies", _train_rows(REPLY_SETS, "unsafe"), screens["replies"])}


def current_cache_folders() -> dict[str, Path]:
    """The cache folders the default detector and output filter's fast paths load from."""
    return {"crisis": _cache_folder("crisis", _train_rows(CRISIS_SETS, "positive")),
            "replies": _cache_folder("replies", _train_rows(REPLY_SETS, "unsafe"))}


def fitted() -> bool:
    """Whether both default fast paths are already fitted on this machine and their second stages are
    shipped (or kept here) for the current data and code: otherwise the first ``detector()`` or
    ``output_filter()`` call fits what is missing."""
    from ..models import cache_dir

    if not all((folder / "meta.json").exists() for folder in current_cache_folders().values()):
        return False
    if _screen_setting().lower() == "none":
        return True
    stale = stale_shipped()
    return all((cache_dir() / "safety" / f"{name}-stage-{_stage_digest(key)}.json").is_file()
               for name, key in current_stage_keys().items() if name in stale)


def prune(dry_run: bool = False) -> list[Path]:
    """Remove this machine's cached fits of earlier data, code or library versions (fast paths and
    second stages), keeping the current ones and any fit being written; returns what was (or, with
    ``dry_run``, would be) removed."""
    import shutil

    current = current_cache_folders()
    keep = set(current.values())
    if _screen_setting().lower() != "none":
        keep |= {current[n].parent / f"{n}-stage-{_stage_digest(k)}.json" for n, k in current_stage_keys().items()}
    root = current["crisis"].parent
    fit = re.compile(rf"({'|'.join(current)})(-[0-9a-f]{{16}}|-stage-[0-9a-f]{{16}}\.json)")
    stale = sorted(p for p in root.iterdir() if fit.fullmatch(p.name) and p.is_dir() == (not p.suffix)
                   and p not in keep) if root.is_dir() else []
    if not dry_run:
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return stale


def ship(model: _Cascade) -> Path:
    """Write ``model``'s second stage (its key, rules, probe and how it was fitted) to ``SHIPPED_FIT``."""
    path = SHIPPED_FIT / f"{model.name}.json"
    saved = {k: v for k, v in model.stage.items() if k != "source"}
    _write_aside(path, lambda tmp: tmp.write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8"))
    print(f"wrote {shown(path)} ({path.stat().st_size // 1024} KB)")
    return path
