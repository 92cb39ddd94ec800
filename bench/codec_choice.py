"""Which lossless codec for KV on SSD? Ratio and single-core speed on real SmolLM2 KV.

Candidates: tierkv's default (byte-plane split + zstd level 1 where planes save >= 1.3x, else the
layer stored as it is), the same always split (levels 1 and 3), zstd on unsplit bytes, tierkv's raw
codec, and blosc2 (shuffle + zstd / lz4) when installed. Per 256-token block, all layers, in fp32
(the model's own KV dtype) and bf16. Decoding is what a cold reload pays; encoding happens in the
background writer.

    python bench/codec_choice.py [--out bench/results/codec_choice.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import zstandard

sys.path.insert(0, os.path.dirname(__file__))
from common import int_at_least, machine, real_kv, timed, write_json  # noqa: E402

import tierkv  # noqa: E402
from tierkv.blocks import pack_block  # noqa: E402
from tierkv.codec import RawCodec, ZstdPlanesCodec, decode_layer, encode_block, parse_block  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/codec_choice.json")
    ap.add_argument("--tokens", type=int_at_least(1), default=1024)
    args = ap.parse_args()
    torch.set_num_threads(1)
    kv32 = real_kv(args.tokens)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        spec = tierkv.KVSpec.gqa("smollm2", 30, 3, 64, dtype)
        n = 256
        kv = [(k[:, :n].to(dtype), v[:, :n].to(dtype)) for k, v in kv32]
        payload = torch.empty(n * spec.bytes_per_token, dtype=torch.uint8)
        pack_block(spec, kv, 0, n, payload)
        raw = payload.numpy()
        size = raw.size

        def tierkv_codec(codec):
            value = encode_block(codec, b"F" * 16, spec, raw, n)
            out = np.empty_like(raw)

            def dec():
                parsed = parse_block(value, b"F" * 16, spec, codec, n)
                for layer in range(spec.num_layers):
                    a, b = spec.layer_span(layer, n)
                    decode_layer(codec, parsed, layer, out[a:b])
            enc = timed(lambda: encode_block(codec, b"F" * 16, spec, raw, n), 5)
            d = timed(dec)
            assert np.array_equal(out, raw)
            return len(value), enc, d

        cands = {"zstd-planes L1 (tierkv default: long matches only)": lambda: tierkv_codec(ZstdPlanesCodec(1)),
                 "zstd-planes L1, zstd's own level-1 match finder": lambda: tierkv_codec(
                     ZstdPlanesCodec(1, long_matches_only=False)),
                 "zstd-planes L1, always split": lambda: tierkv_codec(ZstdPlanesCodec(1, min_ratio=1.0)),
                 "zstd-planes L3, always split": lambda: tierkv_codec(ZstdPlanesCodec(3, min_ratio=1.0)),
                 "raw (tierkv, crc32)": lambda: tierkv_codec(RawCodec())}

        def zstd_unsplit():
            c, d = zstandard.ZstdCompressor(level=1, write_checksum=True), zstandard.ZstdDecompressor()
            value = c.compress(raw)
            return len(value), timed(lambda: c.compress(raw), 5), timed(lambda: d.decompress(value))
        cands["zstd L1, no plane split"] = zstd_unsplit
        try:
            import blosc2

            for codec in (blosc2.Codec.ZSTD, blosc2.Codec.LZ4):
                def b2(codec=codec):
                    cp = {"codec": codec, "clevel": 1, "typesize": payload.numel() and kv[0][0].element_size(),
                          "filters": [blosc2.Filter.SHUFFLE], "nthreads": 1}
                    value = blosc2.compress2(raw, **cp)
                    return len(value), timed(lambda: blosc2.compress2(raw, **cp), 5), \
                        timed(lambda: blosc2.decompress2(value, nthreads=1))
                cands[f"blosc2 shuffle+{codec.name} L1"] = b2
        except ImportError:
            pass
        for name, run in cands.items():
            enc_len, enc, dec = run()
            rows.append({"dtype": str(dtype).removeprefix("torch."), "codec": name, "ratio": size / enc_len,
                         "encode_gbps": size / enc["median_s"] / 1e9, "decode_gbps": size / dec["median_s"] / 1e9,
                         "decode": dec})
            print(f"{rows[-1]['dtype']:>9} {name:<34} ratio {rows[-1]['ratio']:.3f}  "
                  f"encode {rows[-1]['encode_gbps']:.2f} GB/s  decode {rows[-1]['decode_gbps']:.2f} GB/s (1 core)")
    write_json(args.out, {"machine": machine(), "block_tokens": 256, "rows": rows})


if __name__ == "__main__":
    main()
