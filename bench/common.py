"""Helpers shared by the benchmark scripts: real KV capture, timing, JSON output."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import queue
import random
import statistics
import subprocess
import sysconfig
import threading
import time
from typing import Any, Callable, Iterator

import torch


#: CPU features that decide which kernels torch and the codecs run (and so their speed, and on
#: some CPUs the last bits of a model's rows: docs/integration.md, "Short convolutions")
_CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> tuple[str | None, list[str]]:
    """The CPU's model name and which of ``_CPU_FEATURES`` it has, from Linux's cpuinfo; (None, [])
    where there is none. The same VM image has run on different CPUs from one session to the next."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return None, []
    model: str | None = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, [f for f in _CPU_FEATURES if f in flags]


def machine() -> dict[str, Any]:
    import psutil

    model, features = cpu_model()
    return {"cpu": platform.processor() or platform.machine(), "cpu_model": model, "cpu_features": features,
            "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def collected() -> None:
    """Run a full garbage collection now, before a timed run. A full collection walks every
    tracked object of the process: after a bench has imported torch and loaded KV or a model, one
    takes tens of milliseconds, and the interpreter starts one whenever allocations reach its
    threshold. Then it lands inside whichever timed run is going, at random. In an A/A run of
    ``ab_reload.py`` it was most of one child's reported setup time. A server avoids the same
    pauses with ``gc.freeze()`` after start-up; a timed loop inside ``setup_frozen()`` does too."""
    gc.collect()


@contextlib.contextmanager
def setup_frozen() -> Iterator[None]:
    """Leave every object alive now out of the full collections run inside the block.

    A bench's setup (torch imported, KV captured or a model loaded; in the test suite, pytest's
    own objects as well) leaves hundreds of thousands of tracked objects, and each full
    collection walks all of them (192 ms with SmolLM2 loaded, ``bench/gc_pause.py``), once before
    every timed run: the bench smoke tests ran 3:14 with them frozen, 3:54-4:00 before. Frozen
    (``gc.freeze()``) after one collection, they are skipped; what the timed runs create is
    collected as before. The block's end unfreezes them, so garbage cycles among them are not
    kept past it. Where objects are frozen already (an outer block, or a process that froze its
    own), the block leaves freezing and unfreezing to whoever froze them."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def stats_of(xs: list[float]) -> dict[str, Any]:
    """Median, min, max and every value in run order (a round's value is kept, not only the
    spread: on this VM a run can be bimodal, and the rounds show it)."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "runs": list(xs)}


def timed(fn: Callable[[], Any], repeats: int = 7) -> dict[str, float]:
    """Median, min and max seconds of ``repeats`` calls, each after a full collection."""
    ts = []
    with setup_frozen():
        for _ in range(repeats):
            collected()
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "repeats": repeats}


def real_kv(n_tokens: int, cache_dir: str | None = None,
            dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """KV of SmolLM2 (run in ``dtype``) over ``n_tokens`` tokens of standard-library source."""
    from tierkv.integrations.hf import cache_to_kv, load_smollm2, prefill

    model, tok, _ = load_smollm2(cache_dir, dtype=dtype)
    text = ""
    for name in ("functools.py", "dataclasses.py", "argparse.py", "pathlib.py"):
        with open(os.path.join(sysconfig.get_paths()["stdlib"], name), encoding="utf-8") as f:
            text += f.read()
    ids = tok.encode(text, add_special_tokens=False)[:n_tokens]
    _, cache = prefill(model, ids)
    return [(k.clone(), v.clone()) for k, v in cache_to_kv(cache)]


def block_payloads(spec: Any, kv: Any, block_tokens: int, blocks: int, stride: int | None = None) -> list[bytes]:
    """The first ``blocks`` blocks of ``kv``, each block's payload packed by tierkv itself
    (``pack_block``: the raw codec's layout), zero-padded to ``stride`` bytes when given."""
    from tierkv.blocks import pack_block

    size = spec.bytes_per_token * block_tokens
    out = []
    for b in range(blocks):
        payload = torch.zeros(stride or size, dtype=torch.uint8)
        pack_block(spec, kv, b * block_tokens, block_tokens, payload[:size])
        out.append(payload.numpy().tobytes())
    return out


def write_sessions(path: str, values: list[bytes], sessions: int) -> None:
    """``values`` written ``sessions`` times over, one after another, and synced."""
    with open(path, "wb") as f:
        for _ in range(sessions):
            for value in values:
                f.write(value)
        f.flush()
        os.fsync(f.fileno())


def cold(path: str, run: Callable[[], Any]) -> Callable[[], float]:
    """``run`` as a timed method of ``side_by_side``: ``path``'s pages dropped from the page
    cache first (``ColdReadError`` where they stay), then the seconds ``run`` takes."""
    from tierkv.pagecache import make_cold

    def timed_cold() -> float:
        make_cold(path)
        t = time.perf_counter()
        run()
        return time.perf_counter() - t
    return timed_cold


def against_baseline(rows: dict[str, list[float]], nbytes: int, baseline: str) -> dict[str, Any]:
    """Each method's seconds per round, its rate over ``nbytes`` (median of its rounds) and that
    rate against ``baseline``'s: as the ratio of the medians and as the median of the per-round
    ratios (JSON keys as ``direct_ceiling.py`` first wrote them)."""
    gbps = {k: nbytes / statistics.median(v) / 1e9 for k, v in rows.items()}
    return {"seconds": {k: stats_of(v) for k, v in rows.items()}, "gbps": gbps,
            "vs_odirect_reused_buffer": {k: gbps[k] / gbps[baseline] for k in rows},
            "vs_odirect_reused_buffer_paired": {
                k: statistics.median(b / a for a, b in zip(rows[k], rows[baseline])) for k in rows}}


def print_against_baseline(result: dict[str, Any], nbytes: int) -> None:
    """One line per method of ``against_baseline``'s result: median GB/s (range), both ratios."""
    for k, g in result["gbps"].items():
        s = result["seconds"][k]
        print(f"  {k:62s} {g:5.2f} GB/s ({nbytes / s['max'] / 1e9:.2f}-{nbytes / s['min'] / 1e9:.2f})"
              f"  {result['vs_odirect_reused_buffer'][k]:.2f}x of the baseline"
              f" (per round {result['vs_odirect_reused_buffer_paired'][k]:.2f}x)")


#: read buffers of ``ring_read``: its reader runs up to this many chunks ahead of the consumer
RING = 4


def ring_read(path: str, index: list[tuple[int, int, int]], deliver: Callable[[int, memoryview], Any],
              slot_bytes: int, request: int = 4 << 20) -> None:
    """Read chunk after chunk of ``path`` (``index``: page-aligned offset, length, CRC32C) with
    O_DIRECT on one thread, in requests of at most ``request`` bytes, into a ring of ``RING``
    reused huge-page buffers of ``slot_bytes``; on the calling thread check each chunk's CRC32C
    and hand it to ``deliver(i, chunk)`` (a view valid only during the call). Reads into memory
    used a moment before: the fastest way found to read the test machine's disk."""
    from crc32c import crc32c
    from reload import huge_page_buffer

    ring_map, ring = huge_page_buffer(RING * slot_bytes)
    free: queue.SimpleQueue = queue.SimpleQueue()
    ready: queue.SimpleQueue = queue.SimpleQueue()
    for s in range(RING):
        free.put(s)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)

    def reader() -> None:
        try:
            for at, length, _ in index:
                s = free.get()
                if s is None:
                    return
                want = -(-length // 4096) * 4096
                for off in range(0, want, request):
                    n = min(request, want - off)
                    got = os.preadv(fd, [ring[s * slot_bytes + off:s * slot_bytes + off + n]], at + off)
                    if got < min(n, length - off):
                        raise OSError(f"short read: {got} of {n} bytes")
                ready.put(s)
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
            ready.put(e)

    t = threading.Thread(target=reader)
    t.start()
    chunk = None
    try:
        for i, (_, length, crc) in enumerate(index):
            s = ready.get()
            if isinstance(s, BaseException):
                raise s
            chunk = ring[s * slot_bytes:s * slot_bytes + length]
            if crc32c(chunk) != crc:
                raise SystemExit(f"chunk {i}: checksum mismatch")
            deliver(i, chunk)
            free.put(s)
    finally:
        free.put(None)
        t.join()
        os.close(fd)
        chunk = ring = None  # the map closes only once no view of it is left
        ring_map.close()


def pyplot() -> Any:
    """matplotlib's pyplot on a file-only backend, or None (said once) where the optional
    extra is not installed: the benches' plots are optional, their JSON is not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no plot; pip install 'tierkv[plot]')")
        return None
    return plt


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


def disk_read_counters(path: str) -> tuple[int, int, int] | None:
    """(reads completed, sectors read, milliseconds spent reading) of the block device holding
    ``path``, from /proc/diskstats; None off Linux or when the device is not found. Counters are
    device-wide: other processes' reads on the same disk count too."""
    try:
        st = os.stat(path)
        with open("/proc/diskstats") as f:
            for line in f:
                p = line.split()
                if int(p[0]) == os.major(st.st_dev) and int(p[1]) == os.minor(st.st_dev):
                    return int(p[3]), int(p[5]), int(p[6])
    except (OSError, ValueError, IndexError):
        pass
    return None


def preallocated(spec: Any, tokens: int, device: str = "cpu") -> Callable[..., torch.Tensor]:
    """An ``allocate`` for ``restore_async`` that hands out views of one ``CachePool`` reserved
    (and written) now, for sessions of up to ``tokens`` tokens: a server restores into KV memory
    it allocated at start-up, not into fresh tensors that pay a page fault and a zeroed page per
    4 KiB on first write."""
    try:
        from tierkv import CachePool
    except ImportError:  # a version from before session 35 (ab_reload's version A): in the hf module
        from tierkv.integrations.hf import CachePool

    pool = CachePool()
    pool.reserve(spec, tokens, device)
    if hasattr(pool, "allocator"):
        return pool.allocator(spec)

    def allocate(layer: int, index: int, shape: Any, dtype: torch.dtype, device: Any) -> torch.Tensor:
        return pool.buffer(layer, index, (1, *shape), dtype, device)[0, :, :shape[1]]
    return allocate


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an int of at least ``low`` (a count of rounds, sessions, tokens), so
    a bad count stops at the command line instead of as a traceback minutes into a run."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{n} is less than {low}")
        return n
    parse.__name__ = f"int >= {low}"  # argparse names the type in its message
    return parse


def existing_dir(text: str) -> str:
    """An argparse ``type``: a directory that exists (a bench works in a temporary one inside it)."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return text


def add_side_by_side_arguments(ap: Any, rounds: int, out: str) -> None:
    """The options of a bench that times methods side by side on the bench's KV: which KV
    (``--dtype``, ``--synthetic``, ``--cache-dir``), ``--rounds``, the shuffle's ``--seed``, ``--out``."""
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--rounds", type=int_at_least(1), default=rounds)
    ap.add_argument("--synthetic", action="store_true", help="random KV instead of SmolLM2's")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=out)


def add_version_arguments(ap: Any) -> None:
    """The options of a bench that runs tierkv in processes of their own: this checkout's, and
    with ``--a DIR`` another version's (a checkout, or ``git archive`` of a commit), side by side;
    ``--dir``, where to work; and the hidden ``--child ROOT`` / ``--target PATH`` a child gets
    (the script puts ROOT first on its path before anything imports tierkv)."""
    ap.add_argument("--a", default=None, help="another version's directory holding a tierkv package: a row of its own")
    ap.add_argument("--dir", type=existing_dir, default=None,
                    help="working directory on the disk to test (default: a temp dir)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--target", default=None, help=argparse.SUPPRESS)


def tierkv_from(root: str) -> Any:
    """tierkv, checked to be the one under ``root`` (a child process's version)."""
    import tierkv

    if not os.path.abspath(tierkv.__file__).startswith(os.path.abspath(root) + os.sep):
        raise SystemExit(f"tierkv was imported from {tierkv.__file__}, not from {root}")
    return tierkv


def run_child(cmd: list[str], name: str) -> dict[str, Any]:
    """Run a child process; the JSON object on the last line of its output (its error, if any,
    ends the bench)."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{name}: the child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def side_by_side(methods: dict[str, Callable[[], float | None]], rounds: int,
                 seed: int) -> tuple[dict[str, list[float]], list[list[str]]]:
    """Run every method once per round, in an order shuffled per round (this VM's speed drifts
    within minutes), each after a full collection. A method's time is its wall time, or the
    seconds it returns (a time it measured itself). Returns the times per method and the orders."""
    rows: dict[str, list[float]] = {name: [] for name in methods}
    orders = []
    rng = random.Random(seed)
    with setup_frozen():
        for _ in range(rounds):
            order = list(methods)
            rng.shuffle(order)
            orders.append(order)
            for name in order:
                collected()
                t = time.perf_counter()
                reported = methods[name]()
                rows[name].append(time.perf_counter() - t if reported is None else reported)
    return rows, orders
