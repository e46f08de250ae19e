"""Facts about this process and environment that runs record: memory, library versions, machine.

``hardware.py`` says what the CPU computes fast (and so which dtype to use); this module measures
the process (resident memory, sampled while work runs) and describes the set-up a number was
measured on.
"""
from __future__ import annotations

import os
import platform
import resource
import threading

VERSIONED = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")


def versions(packages=VERSIONED) -> dict:
    """Installed version of each package (None when missing)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def machine() -> dict:
    """CPU, cores, torch threads and versions: the line every benchmark figure is read against."""
    import torch

    from .hardware import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(), "python": platform.python_version()}


def private_rss_mb() -> float:
    """Resident memory that is the process's own (RSS minus file-backed pages such as
    memory-mapped weight files, which the kernel can drop)."""
    import psutil

    info = psutil.Process().memory_info()
    return (info.rss - info.shared) / 2**20


def lifetime_peak_rss_mb() -> float:
    """The kernel's high-water mark of this process's resident set since it started. It never
    goes down, so it says nothing about one piece of work in a long-lived process (a test run, a
    server): use ``MemorySampler`` there."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemorySampler:
    """Peak resident memory of a process *during* a block, sampled by a thread every ``interval``
    seconds (inside long calls too, where activations peak), in all and without file-backed pages.

        with MemorySampler() as mem:
            work()
        mem.peak_rss_mb, mem.peak_private_mb, mem.start_rss_mb
    """

    def __init__(self, pid: int | None = None, interval: float = 0.05):
        self.pid, self.interval = pid, interval
        self.start_rss_mb = self.peak_rss_mb = self.peak_private_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self):
        info = self._process.memory_info()
        return info.rss / 2**20, (info.rss - info.shared) / 2**20

    def _run(self):
        while True:
            rss, private = self._read()
            self.peak_rss_mb, self.peak_private_mb = max(self.peak_rss_mb, rss), max(self.peak_private_mb, private)
            if self._stop.wait(self.interval):
                return

    def start(self) -> "MemorySampler":
        import psutil

        self._process = psutil.Process(self.pid)
        self.start_rss_mb, _ = self._read()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> "MemorySampler":
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        rss, private = self._read()  # the end state counts too
        self.peak_rss_mb, self.peak_private_mb = max(self.peak_rss_mb, rss), max(self.peak_private_mb, private)
        return self

    @property
    def grown_mb(self) -> float:
        """Peak resident memory during the block above the resident memory at its start."""
        return self.peak_rss_mb - self.start_rss_mb

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
