"""Shared by the benchmarks: a process's own peak memory."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """Peak RSS of this process in MiB.

    ``VmHWM`` (Linux) rather than ``ru_maxrss``: Linux carries ``ru_maxrss`` across fork+exec, so a
    child process would report its parent's peak if that was larger."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
