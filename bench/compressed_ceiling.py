"""Could compressing fp32 KV make a cold restore beat the disk's O_DIRECT read? A ceiling, no engine.

fp32 KV does not compress enough for tierkv's byte-plane codec to pay on two cores (1.19x saved,
decoded at about 1.7 GB/s per core: ``bench/codec_choice.py``), so tierkv stores it as it is, and
a cold restore can then at best match the disk. This script asks whether a faster decoder would
change that, with the most favourable setting there is, and nothing of the engine around it:

- the codec: blosc2 (a C library with SIMD shuffles and its own decode threads; ``pip install
  blosc2``: it is not a tierkv dependency), one chunk per block of all its layers, about 12 MiB of
  fp32 KV, which its threads decode in parallel. ``--codecs`` picks which of its pipelines to time,
  a row each: byte shuffle + zstd level 1 (``shuffle-zstd1``, the best ratio: 1.20x on fp32,
  1.48x on bf16) and byte shuffle + LZ4 (``shuffle-lz4``, a smaller ratio that decodes about twice
  as fast); LZ4HC is left out because it compresses tens of times slower, too slow for saves;
- the read: one thread reads each chunk with O_DIRECT, in file order, into a ring of reused
  huge-page buffers (the fastest read this disk serves: see ``bench/reload.py``'s baseline);
- the decode: the main thread checks each chunk's CRC32C (blosc2 carries none) and blosc2
  decodes it with ``--decode-threads`` threads straight into a preallocated huge-page result, one
  block after another. A restore's result holds each head's tokens in one run, so blocks would
  have to be scattered per head; that copy is left out here, which favours this row.

Rows, side by side on the same KV, every file's pages dropped before each read:

- ``O_DIRECT sequential, reused huge-page buffer``: the raw KV's bytes, the reload target's
  baseline;
- ``O_DIRECT sequential, whole huge-page destination``: the same read, each 4 MiB to its own place
  (delivering the raw bytes, uncompressed, with no CPU work at all);
- ``blosc2 shuffle+zstd L1, O_DIRECT read ring, N decode threads`` (and ``shuffle+LZ4``): the
  pipeline above, one row per codec; its rate is logical (KV bytes delivered), as the target's is.

    python bench/compressed_ceiling.py [--size 1GiB] [--block-tokens 256] [--decode-threads 2]
                                       [--codecs shuffle-zstd1,shuffle-lz4]
                                       [--rounds 5] [--out bench/results/compressed_ceiling.json]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
from typing import Any, Callable

import numpy as np
from crc32c import crc32c

sys.path.insert(0, os.path.dirname(__file__))
from common import (add_side_by_side_arguments, against_baseline, block_payloads, cold, int_at_least,  # noqa: E402
                    machine, print_against_baseline, ring_read, side_by_side, write_json, write_sessions)
from reload import HUGE_PAGE, TOKENS, huge_page_buffer, odirect_read, session_kv  # noqa: E402

from tierkv.config import parse_size  # noqa: E402

PAGE = 4096
BASELINE = "O_DIRECT sequential, reused huge-page buffer"
WHOLE = "O_DIRECT sequential, whole huge-page destination"
# name -> (the row's label, blosc2 codec name, compression level); filters: byte shuffle
CODECS = {"shuffle-zstd1": ("shuffle+zstd L1", "ZSTD", 1), "shuffle-lz4": ("shuffle+LZ4", "LZ4", 9)}


def write_compressed(path: str, chunks: list[bytes], sessions: int) -> list[tuple[int, int, int]]:
    """Every session's chunks, each on a page of its own; returns (offset, length, crc) per chunk."""
    index = []
    with open(path, "wb") as f:
        for _ in range(sessions):
            for c in chunks:
                at = f.tell()
                f.write(c)
                f.write(b"\0" * ((-len(c)) % PAGE))
                index.append((at, len(c), crc32c(c)))
        f.flush()
        os.fsync(f.fileno())
    return index


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_side_by_side_arguments(ap, rounds=5, out="bench/results/compressed_ceiling.json")
    ap.add_argument("--size", default="1GiB", help="raw KV bytes in total (whole sessions)")
    ap.add_argument("--block-tokens", type=int_at_least(1), default=256)
    ap.add_argument("--decode-threads", type=int_at_least(1), default=2, help="blosc2's decode threads")
    ap.add_argument("--codecs", default="shuffle-zstd1",
                    help=f"comma-separated blosc2 pipelines, a row each: {', '.join(CODECS)}")
    ap.add_argument("--dir", default=None, help="working directory on the disk to test (default: a temp dir)")
    args = ap.parse_args(argv)
    try:
        import blosc2
    except ImportError:
        raise SystemExit("this bench needs blosc2 (pip install blosc2); tierkv itself does not")
    blosc2.set_releasegil(True)  # else each decode holds the GIL, and the reader thread waits on it
    from tierkv.cli import default_cache_dir

    spec, kv = session_kv(args.synthetic, args.cache_dir or default_cache_dir(), args.dtype)
    if TOKENS % args.block_tokens:
        raise SystemExit(f"--block-tokens must divide {TOKENS}")
    payloads = block_payloads(spec, kv, args.block_tokens, TOKENS // args.block_tokens)
    block = len(payloads[0])
    sessions = max(1, parse_size(args.size) // (block * len(payloads)))
    nbytes = sessions * len(payloads) * block
    itemsize = kv[0][0].element_size()
    names = args.codecs.split(",")
    if any(n not in CODECS for n in names):
        raise SystemExit(f"--codecs: pick from {', '.join(CODECS)}")
    packed = {}  # name -> (row label, chunks)
    for name in names:
        label, codec, level = CODECS[name]
        cparams = {"codec": blosc2.Codec[codec], "clevel": level, "typesize": itemsize,
                   "filters": [blosc2.Filter.SHUFFLE], "nthreads": args.decode_threads}
        packed[name] = (f"blosc2 {label}, O_DIRECT read ring, {args.decode_threads} decode threads",
                        [blosc2.compress2(p, **cparams) for p in payloads])
    ratios = {name: block * len(payloads) / sum(map(len, chunks)) for name, (_, chunks) in packed.items()}

    def decode(chunk: memoryview, into: memoryview) -> None:
        blosc2.decompress2(chunk, dst=into, nthreads=args.decode_threads)

    work = tempfile.mkdtemp(prefix="tierkv-compressed-", dir=args.dir)
    raw_path = os.path.join(work, "raw.bin")
    try:  # the maps live until the process ends (a script: nothing to hand back sooner)
        write_sessions(raw_path, payloads, sessions)
        result_map, result = huge_page_buffer(nbytes)
        whole_map, whole = huge_page_buffer(os.path.getsize(raw_path))
        for buf in (result, whole):
            np.frombuffer(buf, np.uint8)[::PAGE] = 1  # written once, as a server's KV memory is

        methods: dict[str, Callable[[], Any]] = {
            BASELINE: lambda: odirect_read(raw_path, huge=True),
            WHOLE: lambda: odirect_read(raw_path, into=whole),
        }
        files = {BASELINE: raw_path, WHOLE: raw_path}
        flat = np.frombuffer(result, np.uint8)
        for name, (row, chunks) in packed.items():
            path = os.path.join(work, f"{name}.bin")
            index = write_compressed(path, chunks, sessions)
            slot = -(-max(map(len, chunks)) // HUGE_PAGE) * HUGE_PAGE
            methods[row] = functools.partial(
                ring_read, path, index, lambda i, chunk: decode(chunk, result[i * block:(i + 1) * block]), slot)
            files[row] = path
            flat[:] = 0
            methods[row]()  # first use: code warmed, and the decoded bytes checked
            for i in range(sessions * len(payloads)):
                if flat[i * block:(i + 1) * block].tobytes() != payloads[i % len(payloads)]:
                    raise SystemExit(f"{row}: block {i} does not hold the KV")
        del flat
        rows, orders = side_by_side({k: cold(files[k], f) for k, f in methods.items()}, args.rounds, args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out: dict[str, Any] = {
        "machine": machine(), "kv": ("synthetic-" if args.synthetic else "smollm2-") + args.dtype,
        "sessions": sessions, "bytes": nbytes, "block_tokens": args.block_tokens,
        "compression_ratio": ratios[names[0]], "compression_ratios": {packed[n][0]: r for n, r in ratios.items()},
        "decode_threads": args.decode_threads,
        "blosc2_version": blosc2.__version__, "rounds": args.rounds, "seed": args.seed,
        "round_orders": orders, **against_baseline(rows, nbytes, BASELINE),
    }
    print(f"{sessions} sessions x {TOKENS} tokens = {nbytes / 2**30:.2f} GiB of {out['kv']}, "
          f"{args.block_tokens}-token blocks, blosc2 ratios "
          + ", ".join(f"{n} {r:.3f}" for n, r in ratios.items()))
    print_against_baseline(out, nbytes)
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
