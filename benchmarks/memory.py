"""Peak memory of this process: ``manymodels.runinfo.peak_rss_mb`` (``VmHWM``), and a reset.

``ru_maxrss`` is inherited across fork and ``execve`` on Linux, so benchmarks use ``VmHWM``; writing
``5`` to ``/proc/self/clear_refs`` starts it over (e.g. after a benchmark generated its input data in
the same process).
"""

from __future__ import annotations

from manymodels.runinfo import peak_rss_mb

__all__ = ["peak_rss_mb", "reset_peak"]


def reset_peak() -> bool:
    """Start the peak over from the current RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
