"""How much CPU other processes used while we timed: timings taken beside other
work are not the machine's speed, and the record should say so."""
from __future__ import annotations

import os
import time

MIN_WINDOW_S = 0.5
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _HZ


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class OtherLoad:
    """Context manager; `.fraction` = CPU used by other processes / (wall x cores),
    or None where it cannot be measured (no /proc/stat, window under MIN_WINDOW_S)."""

    def __enter__(self):
        self._busy, self._own, self._t = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
        self.fraction = None
        return self

    def __exit__(self, *exc):
        busy = _machine_busy_s()
        wall = time.perf_counter() - self._t
        # /proc/stat counts in clock ticks (10 ms): shorter windows would be mostly noise
        if busy is not None and self._busy is not None and wall >= MIN_WINDOW_S:
            other = (busy - self._busy) - (_own_cpu_s() - self._own)
            self.fraction = min(1.0, max(0.0, other / (wall * (os.cpu_count() or 1))))
        return False
