"""Host memory: handing freed allocator memory back to the OS, and reading peak RSS.

Streaming a checkpoint allocates and frees one large temporary per tensor (the
bitsandbytes CPU quantizer makes fp32 copies). glibc keeps those freed blocks in
its heap, so without a trim the process's RSS creeps up towards the size of the
whole checkpoint even though nothing holds it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        _libc = None


class FreedMemory:
    """Calls `malloc_trim` once every `every_bytes` of processed tensors.

    Measured on a 550 MB checkpoint: trimming every 32-64 MB still let peak RSS
    swing between runs (220 to 420 MB above the start), because the quantizer's
    worker threads leave freed blocks in several arenas; trimming after each
    weight-sized tensor held it at 220-230 MB. The price is page faults when the
    next temporaries are allocated (+~40% load time on a 2-core CPU, less on
    large models where quantizing dominates). The 1 MiB default lets small tensors
    (norms, biases) share one trim.
    """

    def __init__(self, every_bytes: int = 2**20):
        self.every_bytes = every_bytes
        self.pending = 0

    def processed(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.every_bytes:
            release()
            self.pending = 0


def release() -> None:
    """Return free heap pages to the OS (a no-op where glibc is absent)."""
    if _libc is not None:
        _libc.malloc_trim(0)


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (reported in KiB) in MiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _maxrss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MiB.

    On Linux this is VmHWM, which belongs to the address space: unlike
    `ru_maxrss` it does not inherit the parent's peak across fork/exec, and
    `reset_peak_rss` can restart it.
    """
    peak = _status_mb("VmHWM")
    return peak if peak is not None else _maxrss_mb()


def current_rss_mb() -> float:
    current = _status_mb("VmRSS")
    return current if current is not None else _maxrss_mb()


def reset_peak_rss() -> bool:
    """Restart the peak at the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
