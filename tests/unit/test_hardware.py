"""The CPU is read from /proc/cpuinfo, never assumed: the three kinds of machine this project meets."""
from pathlib import Path

import pytest

from utils import hardware

CPUINFO = {
    "amd-avx2": ("AMD EPYC", "fpu sse2 avx f16c avx2 fma bmi2"),
    "amd-avx512-bf16": ("AMD EPYC 9R14", "avx2 avx512f avx512bw avx512_bf16 avx512_vnni"),
    "intel-amx": ("Intel(R) Xeon(R) Platinum 8488C", "avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"),
}


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    def use(kind):
        name, flags = CPUINFO[kind]
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nvendor_id\t: x\nmodel name\t: {name}\nflags\t\t: {flags}\n\n"
                        f"processor\t: 1\nmodel name\t: {name}\nflags\t\t: {flags}\n")
        real = Path.read_text
        monkeypatch.setattr(Path, "read_text",
                            lambda self, *a, **k: real(info if str(self) == "/proc/cpuinfo" else self, *a, **k))
        hardware.cpu_flags.cache_clear()
        hardware.cpu_model.cache_clear()

    yield use
    hardware.cpu_flags.cache_clear()
    hardware.cpu_model.cache_clear()


@pytest.mark.parametrize("kind, native, picked", [("amd-avx2", False, "fp32"), ("amd-avx512-bf16", True, "bf16"),
                                                  ("intel-amx", True, "bf16")])
def test_flags_model_and_the_dtype_auto_picks(cpu, kind, native, picked):
    cpu(kind)
    summary = hardware.cpu_summary()
    assert summary["cpu"] == CPUINFO[kind][0] and summary["avx2"]
    assert summary["avx512_bf16"] == ("avx512_bf16" in CPUINFO[kind][1])
    assert summary["amx_bf16"] == (kind == "intel-amx")
    assert hardware.fast_bf16() is native
    assert hardware.pick_dtype("auto", "judge") == picked and hardware.pick_dtype("fp32") == "fp32"
    with pytest.raises(ValueError, match=r"dtype='fp16' for training; expected one of"):
        hardware.pick_dtype("fp16", "training", hardware.COMPUTE_DTYPES)


def test_without_cpuinfo_nothing_is_claimed(monkeypatch):
    def missing(self, *a, **k):
        raise OSError("no /proc here")

    monkeypatch.setattr(Path, "read_text", missing)
    hardware.cpu_flags.cache_clear()
    hardware.cpu_model.cache_clear()
    try:
        assert hardware.cpu_flags() == frozenset() and not hardware.fast_bf16()
        assert hardware.pick_dtype("auto") == "fp32" and hardware.cpu_model()
    finally:
        hardware.cpu_flags.cache_clear()
        hardware.cpu_model.cache_clear()
