"""Do leases survive grants and releases at once? Two processes on one lease table.

Two processes (spawned) grant and release leases on the same keys as fast as they can, each
holding at most one lease per key at a time, so a key's slot never holds more than two owners
and no lease may be lost. After each grant a process checks, with grants held off (the marks'
lock, which every version's grants wait for: a settled view), that each of its leases is still
held, then releases them. The keys lie in distinct lease slots, so none takes another's slot
(the table's hint-by-design loss): every lease found gone was lost to the race. Reports the
leases found gone, per key count.

    python bench/lease_race.py [--keys 64 512] [--seconds 4] [--out bench/results/lease_race.json]

Run it against another version with ``PYTHONPATH=<a tree holding tierkv>`` (e.g. ``git archive
3156c01 tierkv | tar -x -C /tmp/old``): before session 47 grants held the table's lock shared and
releases none, and leases were lost. Nothing is timed; the counts are the result.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from common import int_at_least, machine, write_json  # noqa: E402


def _churn(directory: str, keys: list[bytes], seconds: float) -> tuple[int, int, int]:
    """Grant, check, release, for ``seconds``; returns (leases found gone, leases checked, rounds)."""
    from tierkv.leases import Leases

    table = Leases(directory)
    lost = checked = rounds = 0
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            me = table.new_owner()
            table.grant(keys, me)
            table._lock(1, exclusive=True)
            try:
                for k in keys:
                    checked += 1
                    lost += table.standing(k, me) != "held"
            finally:
                table._unlock(1)
            table.release(keys, me)
            rounds += 1
    finally:
        table.close()
    return lost, checked, rounds


def distinct_slot_keys(n: int) -> list[bytes]:
    """``n`` random 16-byte block keys, no two in one lease slot."""
    from tierkv.leases import LEASE_SLOTS

    keys: dict[int, bytes] = {}
    while len(keys) < n:
        k = os.urandom(16)
        keys.setdefault(int.from_bytes(k[:8], "little") % LEASE_SLOTS, k)
    return list(keys.values())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int_at_least(1), nargs="+", default=[64, 512])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "lease_race.json"))
    args = ap.parse_args(argv)
    import tierkv

    results: dict[str, Any] = {"machine": machine(), "tierkv": os.path.dirname(tierkv.__file__),
                               "seconds": args.seconds, "runs": []}
    ctx = mp.get_context("spawn")
    for n in args.keys:
        keys = distinct_slot_keys(n)
        with tempfile.TemporaryDirectory() as d, ctx.Pool(2) as pool:
            got = pool.starmap(_churn, [(d, keys, args.seconds)] * 2)
        lost, checked, rounds = (sum(g[i] for g in got) for i in range(3))
        results["runs"].append({"keys": n, "lost": lost, "checked": checked, "rounds": rounds,
                                "lost_fraction": lost / checked if checked else None})
        print(f"{n} keys: {lost} of {checked} leases checked were gone ({100 * lost / max(checked, 1):.1f} %), "
              f"{rounds} grant-release rounds", flush=True)
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
