"""Peak-RSS helpers shared by the CPU memory benchmarks (Linux ``/proc``)."""

from __future__ import annotations


def status_bytes(field: str) -> int:
    """A byte field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Set the kernel's peak-RSS mark (VmHWM) to the current RSS, forgetting what came before (the model load)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
