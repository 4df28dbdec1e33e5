"""Peak memory of this process, measured so that it means what it says.

``getrusage(...).ru_maxrss`` is inherited across fork and ``execve`` on Linux: a child started by a
process that once held 4 GB reports at least 4 GB. ``VmHWM`` in ``/proc/self/status`` is the peak
of this address space only, and writing ``5`` to ``/proc/self/clear_refs`` resets it (e.g. after a
benchmark generated its input data in the same process).
"""

from __future__ import annotations

import resource

__all__ = ["peak_rss_mb", "reset_peak"]


def peak_rss_mb() -> float:
    """Peak resident set size of this process's address space, in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak() -> bool:
    """Start the peak over from the current RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
