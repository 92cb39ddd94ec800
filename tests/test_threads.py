"""Concurrent save / restore / prefetch / drop from several threads of one process."""

import random
import threading
import time

import pytest

import tierkv
from conftest import BLOCK, assert_kv_equal, make_kv, small_spec

SPEC = small_spec(layers=3)


@pytest.mark.parametrize("threads,seconds", [
    (8, 40),
    pytest.param(8, 600, marks=pytest.mark.stress),
])
def test_threads_save_restore_prefetch_drop(open_store, threads, seconds):
    s = open_store(SPEC, device_bytes=6 * BLOCK * SPEC.bytes_per_token,
                   host_bytes=6 * BLOCK * SPEC.bytes_per_token, persist="write_through")
    # shared 2-block prefix so sessions share blocks across threads
    ref = make_kv(SPEC, 6 * BLOCK, seed=42)
    base = list(range(6 * BLOCK))
    errors, checks, samples = [], [0], [0]
    stop = time.monotonic() + seconds

    def worker(wid):
        rng = random.Random(wid)
        try:
            while time.monotonic() < stop:
                sid = f"s{rng.randrange(6)}"
                n = rng.randrange(1, 6 * BLOCK)
                op = rng.random()
                if op < 0.4:
                    s.save(base[:n], [tuple(x[:, :n] for x in layer) for layer in ref], session=sid)
                elif op < 0.75:
                    r = s.restore(base[:n], session=sid)
                    if r.num_tokens:
                        assert_kv_equal(r.kv, [tuple(x[:, :r.num_tokens] for x in layer) for layer in ref])
                        checks[0] += 1
                elif op < 0.9:
                    h = s.prefetch(base[:n], session=sid)
                    r = h.result()
                    if r.num_tokens:
                        assert_kv_equal(r.kv, [tuple(x[:, :r.num_tokens] for x in layer) for layer in ref])
                else:
                    try:
                        s.drop_session(sid)
                    except tierkv.UnknownSessionError:
                        pass
                # Budget invariants, sampled after every operation: each tier's usage is exactly the
                # sum of the payloads it holds, never negative, and no block is in two tiers.
                with s._lock:
                    seen = set()
                    for tier in s._tiers.values():
                        held = list(tier._lru.values())
                        assert tier.used == sum(b.nbytes for b in held) >= 0
                        assert all(b.tier == tier.name and b.payload is not None for b in held)
                        keys = {b.key for b in held}
                        assert not keys & seen
                        seen |= keys
                    samples[0] += 1
        except Exception as e:  # noqa: BLE001 - collected and re-raised in the main thread
            errors.append(e)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors, errors
    assert checks[0] > 20 and samples[0] > 100
    s.flush()
    st = s.stats()
    assert st["resident_bytes"]["device"] <= s.config.device_bytes
    assert st["resident_bytes"]["host"] <= s.config.host_bytes
    # every session left is restorable and exact, also after a reopen
    path = s.path
    s.close()
    s = open_store(SPEC, path=path)
    for i in range(6):
        try:
            n = s.session_info(f"s{i}")["tokens"]
        except tierkv.UnknownSessionError:
            continue
        r = s.restore(base[:n], session=f"s{i}")
        assert r.num_tokens == n
        assert_kv_equal(r.kv, [tuple(x[:, :n] for x in layer) for layer in ref])
