import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from utils import system

ROOT = Path(__file__).resolve().parents[2]


def test_memory_sampler_sees_a_peak_inside_the_block_and_not_before_it():
    before = np.ones(40 * 2**20 // 8)  # resident before the block: not growth
    with system.MemorySampler(interval=0.01) as mem:
        block = np.ones(200 * 2**20 // 8)  # 200 MB, touched
        # a sampler sees what lasts at least one interval: held for several, then gone before the end
        # (deleted at once, the last sample could land while the pages were still being filled:
        # 122 of 200 MB once, late in a full test run)
        time.sleep(0.1)
        del block
    assert mem.grown_mb > 150, mem.__dict__
    assert mem.peak_rss_mb >= mem.start_rss_mb + 150 and mem.peak_private_mb > 0
    with system.MemorySampler(interval=0.01) as idle:
        pass
    assert idle.grown_mb < 50
    del before


def test_versions_and_machine_name_what_they_measured():
    v = system.versions(("torch", "no-such-package-xyz"))
    assert v["torch"] and v["no-such-package-xyz"] is None
    m = system.machine()
    assert m["cores"] >= 1 and m["cpu"] and m["torch_threads"] >= 1


_FREE_AND_MEASURE = """
import ctypes, ctypes.util, sys
from utils import system
if sys.argv[1] == "lean":
    print(system.lean_allocator())
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
size = 8 * 2**20
before = rss_mb()
for _ in range(3):  # once an 8 MiB block is freed, glibc serves the next ones from its heap and keeps them
    p = libc.malloc(size); ctypes.memset(p, 1, size); libc.free(p)
print(rss_mb() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not Path("/proc/self/statm").exists(),
                    reason="glibc on Linux only")
def test_the_lean_allocator_hands_freed_buffers_back_and_respects_the_environment():
    def run(mode, **env):
        out = subprocess.run([sys.executable, "-c", _FREE_AND_MEASURE, mode], capture_output=True, text=True,
                             cwd=ROOT, env={**os.environ, **env}, check=True).stdout.split("\n")
        return [line for line in out if line]

    kept_by_default = float(run("default")[-1])
    said, kept_lean = run("lean")
    assert said.startswith("glibc mmap threshold 131072")
    assert kept_by_default >= 7 and float(kept_lean) < 1  # MB still resident after the frees
    said, _ = run("lean", MALLOC_MMAP_THRESHOLD_="65536")
    assert said == "glibc mmap threshold 65536 bytes (from the environment)"
