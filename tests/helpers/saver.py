"""Child process for the crash and multi-process tests: saves sessions in a loop.

    python saver.py STORE SEED [--shared] [--wait]

Prints "start SID SEED N" before each save and "ok SID SEED N" once ``save(...).wait()`` returned
(write-through: durable). A parent kills it at random moments, or several run side by side.
With ``--wait`` it imports, then opens the store only once a line arrives on stdin (and exits
at end of input): a parent starts the next process while the one before it still runs.
"""

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import torch  # noqa: E402

import tierkv  # noqa: E402
from conftest import BLOCK, make_kv, small_spec  # noqa: E402


def tokens_for(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


def main() -> None:
    store, seed = sys.argv[1], int(sys.argv[2])
    shared = "--shared" in sys.argv
    if "--wait" in sys.argv and not sys.stdin.readline():
        return
    rng = random.Random(seed)
    spec = small_spec()
    with tierkv.TierKV(store, spec, block_tokens=BLOCK, persist="write_through", ssd_bytes="256MiB",
                       device_bytes="256KiB", host_bytes="256KiB") as s:
        i = 0
        while True:
            i += 1
            sid = f"p{seed}-s{rng.randrange(5)}" if not shared or i % 2 else "shared"
            vseed = seed * 1_000_000 + i
            n = rng.randrange(1, 6 * BLOCK)
            print(f"start {sid} {vseed} {n}", flush=True)
            s.save(tokens_for(vseed, n), make_kv(spec, n, seed=vseed), session=sid).wait()
            print(f"ok {sid} {vseed} {n}", flush=True)
            if shared and i % 3 == 0 and sid != "shared":  # restore what this process wrote, alongside the others
                r = s.restore(tokens_for(vseed, n), session=sid)
                assert r.num_tokens == n
                want = make_kv(spec, n, seed=vseed)
                for a, b in zip(r.kv, want):
                    assert all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(a, b))
                print(f"restored {sid} {vseed} {n}", flush=True)
            if shared and sid == "shared":
                # the shared session is rewritten by every process: restore it by content; other
                # processes may have replaced it meanwhile, so any prefix may come back, but exact
                r = s.restore(tokens_for(vseed, n))
                want = make_kv(spec, n, seed=vseed)
                for a, b in zip(r.kv, want):
                    assert all(torch.equal(x.view(torch.int16), y[:, :r.num_tokens].view(torch.int16))
                               for x, y in zip(a, b))
                print(f"shared-restored {sid} {vseed} {r.num_tokens}", flush=True)
            if i >= 10_000:
                return


if __name__ == "__main__":
    main()
