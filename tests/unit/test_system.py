import numpy as np

from utils import system


def test_memory_sampler_sees_a_peak_inside_the_block_and_not_before_it():
    before = np.ones(40 * 2**20 // 8)  # resident before the block: not growth
    with system.MemorySampler(interval=0.01) as mem:
        block = np.ones(200 * 2**20 // 8)  # 200 MB, touched
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
