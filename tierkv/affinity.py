"""Keeping the I/O threads on separate CPUs.

Primitives:
    AFFINITIES: the accepted values of ``TierKVConfig.io_affinity``.
    cpu_groups: how a set of CPUs is divided among a number of threads.
    spread_initializer: the I/O pool's thread initializer that applies that division.

A restore wakes the pooled I/O threads all at once from the caller's thread. Linux places a woken
thread near its waker, so two decode threads often start on the same CPU and share it until the
load balancer moves one. Giving each pooled thread its own share of the CPUs the process may use
keeps them apart from the first read: on this project's 2-CPU machine a cold fp32 restore ran
1.065x as fast with the threads spread as without, side by side in one process
(``bench/reload_timeline.py``; docs/benchmarks.md, session 22).

Each thread gets a disjoint, contiguous slice of the allowed CPUs (contiguous: neighbouring CPUs
share caches), so on a large machine a thread can still move within its slice; with more threads
than CPUs they take one CPU each, in turn. Only the I/O threads are restricted, never the
caller's: the process's own affinity (taskset, cgroups) is the set that is divided.
"""

from __future__ import annotations

import itertools
import os
import threading
from typing import Callable, Sequence

AFFINITIES = ("spread", "inherit")


def cpu_groups(allowed: Sequence[int], threads: int) -> list[frozenset[int]]:
    """The CPU set of each of ``threads`` threads sharing ``allowed``: disjoint contiguous slices
    as even as possible, or one CPU each in turn when threads outnumber CPUs. Empty (leave every
    thread where it is) when there is nothing to spread: one CPU or one thread."""
    cpus = sorted(set(allowed))
    if threads < 2 or len(cpus) < 2:
        return []
    if threads >= len(cpus):
        return [frozenset({cpus[i % len(cpus)]}) for i in range(threads)]
    return [frozenset(cpus[i * len(cpus) // threads:(i + 1) * len(cpus) // threads]) for i in range(threads)]


def spread_initializer(threads: int, policy: str,
                       refused: Callable[[], None] = lambda: None) -> Callable[[], None] | None:
    """A ``ThreadPoolExecutor`` initializer that moves each new pool thread onto its own CPU
    group (``policy == "spread"``); None where that cannot or need not be done. ``refused`` is
    called in a thread whose move the kernel refused (the thread then runs where it was)."""
    if policy != "spread" or not hasattr(os, "sched_setaffinity"):
        return None
    try:
        groups = cpu_groups(os.sched_getaffinity(0), threads)
    except OSError:
        return None
    if not groups:
        return None
    slots = itertools.count()
    lock = threading.Lock()

    def initializer() -> None:
        with lock:
            group = groups[next(slots) % len(groups)]
        try:
            os.sched_setaffinity(0, group)  # 0: the calling thread, on Linux
        except OSError:  # a CPU went away (hotplug, a cpuset shrunk): it runs where it may
            refused()
    return initializer
