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


def libc():
    """The C library, or None where it cannot be loaded."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_freed_memory() -> None:
    """Hand memory the allocator keeps after large frees back to the OS (glibc only; elsewhere a no-op)."""
    trim = getattr(libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


LEAN_MMAP_THRESHOLD = 128 * 1024  # bytes; glibc's own default starts here and climbs to 32 MiB


def lean_allocator(threshold: int = LEAN_MMAP_THRESHOLD) -> str:
    """Make glibc serve every allocation above ``threshold`` bytes by its own mapping, so freeing it
    returns the memory to the system at once. By default glibc raises that threshold as large
    blocks are freed (up to 32 MiB), after which freed activations stay in its heap and the next
    phase (the backward pass, an evaluation) grows the process further. Fixed at 128 KiB, 8-bit
    LoRA training of Qwen2.5-1.5B peaked at 5.1 GB instead of 6.1 GB, for about 10-15% fewer
    tokens/s (each step maps fresh pages): training's ``lean_allocator`` option, off by default.
    It cannot be undone for the process (glibc stops adjusting the threshold once it is set).

    Returns what was done, for run records. A ``MALLOC_MMAP_THRESHOLD_`` set in the environment is
    left alone (the caller chose); not glibc (macOS, musl): nothing is changed."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return f"glibc mmap threshold {os.environ['MALLOC_MMAP_THRESHOLD_']} bytes (from the environment)"
    mallopt = getattr(libc(), "mallopt", None)
    if mallopt is None:
        return "allocator unchanged (not glibc)"
    m_mmap_threshold = -3  # glibc's M_MMAP_THRESHOLD
    if mallopt(m_mmap_threshold, int(threshold)) != 1:
        return "allocator unchanged (mallopt refused)"
    return f"glibc mmap threshold {int(threshold)} bytes (lean: freed buffers go back at once)"


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
