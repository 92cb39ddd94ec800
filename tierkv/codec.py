"""Self-describing, checksummed encoding of one block's payload for the SSD tier.

Primitives:
    Codec: the seam where byte encoding can change (``encode_plane`` / ``decode_plane``).
    ZstdPlanesCodec: lossless; splits each layer into byte planes and zstd-compresses each plane.
    RawCodec: stores planes as they are, with a CRC32C each.
    encode_block / parse_block / decode_layer: the value format on disk.

Why byte planes + zstd level 1 (``python bench/codec_choice.py``; real SmolLM2 KV, 256-token
blocks, one core; bench/results/codec_choice.json): the low bytes of each element (mantissa) are
noise (ratio 1.01) while the top byte (sign, exponent) compresses 2.8x. Splitting planes gives
1.19x on fp32 and 1.47x on bf16, against 1.09x and 1.27x for zstd on unsplit bytes, and level 1
beats level 3 on both ratio and speed. Level 1 with its match finder limited to long matches
(``ZstdPlanesCodec.long_matches_only``) decodes bf16 1.23x faster than zstd's own level-1
parameters at a slightly better ratio. zstd stores incompressible planes as raw blocks, so they
decode at memory speed with their XXH64 checksum. blosc2 (shuffle + zstd) reaches the same ratio
and decodes faster per core, but carries no checksum: adding a checksum pass and the copy
into the caller's tensors (we decode straight into them) leaves it within ~20%, not worth a
dependency. On a 2-core machine even bf16's 1.47x does not pay against a 1.5-2.5 GB/s disk (zstd
decodes ~1.4 GB/s per core): there ``ssd_codec="raw"`` reloads faster (docs/benchmarks.md).

Checksums are CRC32C (the ``crc32c`` package: SSE4.2 instructions, the GIL released): a stored
fp32 layer is read straight into the caller's tensors and then checksummed, and with zlib's CRC32
that pass was most of a restore's user CPU, taken from the prefill it overlaps (a checked copy of
a stored layer, bench/codec_choice.py: 2.83 GB/s with zlib's CRC32, 7.00 GB/s with CRC32C).

Value layout (all integers little-endian)::

    magic "TKVB" | u16 format | u8 codec id | u8 flags | 16 B store fingerprint
    | u32 n_tokens | u32 n_layers | u32 page, u32 pad (flag ALIGNED only)
    | per layer: u8 planes k | u8 mode | per plane: u32 length, u32 crc32c (stored mode only)
    | u32 crc32c of everything above, seeded with the crc32c of the block's key
    | pad zero bytes (flag ALIGNED only) | plane bytes, layer after layer

Flag ALIGNED (bit 0): ``pad`` zero bytes lie between the header and the planes, chosen by the
writer so that the planes start on a page of the store's file (``encode_block``'s ``align``),
and each stored layer starts ``page``-aligned from there (zero bytes before it, after a
compressed layer). A stored layer can then be read with O_DIRECT straight into page-aligned
memory (``ssd_page_cache="bypass"``). Values without the flag (every value written before it existed)
parse as before.

Mode 0: the layer's bytes split into k byte planes, each encoded by the codec (zstd frames carry
their own XXH64). Mode 1 ("stored"): the layer's bytes as they are, one plane with a CRC32C. The
zstd-planes codec stores a layer in mode 1 when its planes would not save ``min_ratio`` (1.3x):
on fp32 KV (1.19x) decoding planes costs twice the CPU of a copy, and a cold reload of 400 MiB ran
1.16 GB/s stored against 0.81 GB/s split (``bench/reload.py --only-tierkv --codec raw|zstd-planes``).
A layer whose planes did not pay is not compressed again for the next blocks: after f
failures in a row, the next ``2**f - 1`` blocks (at most ``_MAX_SKIP``) store it without trying.
fp32 KV's planes were otherwise compressed whole on every save, only to be thrown away: most of
the writer's time (``bench/save_bound.py``). Compressing a sample of each plane first did not
decide it as well: in a probe, SmolLM2's first layer saved more than 1.3x whole in most blocks,
and less in its sampled parts. Which mode a layer gets changes only its size and
decode cost; a value decodes the same either way.

A value whose header, fingerprint, lengths or any plane checksum does not match is rejected with
``CorruptValueError``; the engine counts it as a miss and never returns its bytes.
"""

from __future__ import annotations

import struct
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import zstandard
from crc32c import crc32c

from .errors import TierKVError
from .spec import FORMAT_VERSION, KVSpec

__all__ = ["Codec", "ZstdPlanesCodec", "RawCodec", "CODECS", "make_codec", "CorruptValueError",
           "encode_block", "parse_block", "decode_layer", "iter_layer_planes", "read_stored_layer", "ParsedBlock",
           "layer_itemsize", "header_bound", "join_byte_pair", "stored_span", "read_stored_layers"]

MAGIC = b"TKVB"
_HEAD = struct.Struct("<4sHBB16sII")
_PLANE = struct.Struct("<II")
_U32 = struct.Struct("<I")
#: header flag: stored layers start on a page of the store's file (``encode_block``'s ``align``)
_ALIGNED = 0x01
#: with _ALIGNED, after the fixed head: the page size, the zero bytes between header and planes
_ALIGN_EXT = struct.Struct("<II")
_MAX_PAGE = 1 << 30
_MODE_PLANES, _MODE_STORED = 0, 1
#: blocks a layer whose planes keep failing to pay is stored without trying, at most
_MAX_SKIP = 15
_LITTLE = sys.byteorder == "little"


class CorruptValueError(TierKVError):
    """A stored value failed its header, fingerprint or checksum test (treated as a miss)."""


class ValueGoneError(CorruptValueError):
    """A value, and its block's record, left the store between a restore's match and its read:
    evicted or dropped, by this process or another. A miss like a damaged value, but nothing
    is damaged: counted in ``stats()["vanished_blocks"]``, not ``corrupt_blocks``."""


class Codec:
    """Encodes one byte plane. Subclasses set ``name``, ``codec_id`` and ``checksum_in_frame``."""

    name = ""
    codec_id = 0
    #: planes carry their own checksum (True) or need the CRC32C in the header (False)
    checksum_in_frame = False
    #: split each layer into byte planes (one per byte of its element) before encoding
    split_planes = True

    def encode_plane(self, plane: np.ndarray) -> bytes:
        """Encode a contiguous uint8 plane."""
        raise NotImplementedError

    def decode_plane(self, frame: memoryview, size: int) -> memoryview | bytes:
        """Decode a frame that must expand to exactly ``size`` bytes; raise CorruptValueError."""
        raise NotImplementedError


class ZstdPlanesCodec(Codec):
    """Byte-plane split + zstd with a content checksum per plane (lossless).

    ``long_matches_only`` (the default) limits zstd's match finder to matches of 7 bytes or more
    found through a 256-entry hash table. A KV byte plane has few long repeats: nearly all of
    zstd's gain on it is the Huffman coding of its literals, while each short match found costs
    the decoder a sequence to execute. On SmolLM2's bf16 KV this keeps the ratio (1.47x against
    1.45x) and decodes a block 1.23x faster on one core, encodes it 1.57x faster
    (``bench/codec_choice.py``). Only the encoder changes: values written either way decode the
    same, so stores written before stay readable.
    """

    name = "zstd-planes"
    codec_id = 1
    checksum_in_frame = True

    def __init__(self, level: int = 1, min_ratio: float = 1.3, long_matches_only: bool = True) -> None:
        self.level = level
        self.min_ratio = min_ratio
        self.long_matches_only = long_matches_only
        # zstd contexts are not thread-safe: one per thread, created lazily.
        self._local = threading.local()

    def _ctx(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            if self.long_matches_only:
                params = zstandard.ZstdCompressionParameters.from_level(
                    self.level, hash_log=8, min_match=7, write_checksum=True, write_content_size=True)
                compressor = zstandard.ZstdCompressor(compression_params=params)
            else:  # zstd's own parameters for the level and each plane's size
                compressor = zstandard.ZstdCompressor(level=self.level, write_checksum=True, write_content_size=True)
            ctx = (compressor, zstandard.ZstdDecompressor())
            self._local.ctx = ctx
        return ctx

    def encode_plane(self, plane: np.ndarray) -> bytes:
        return self._ctx()[0].compress(plane)

    def decode_plane(self, frame: memoryview, size: int) -> bytes:
        try:
            if zstandard.frame_content_size(frame) != size:
                raise CorruptValueError("zstd frame declares the wrong size")
            out = self._ctx()[1].decompress(frame)
        except zstandard.ZstdError as e:
            raise CorruptValueError(f"zstd frame rejected: {e}") from None
        if len(out) != size:
            raise CorruptValueError("zstd frame expanded to the wrong size")
        return out


class RawCodec(Codec):
    """Every layer stored as it is (mode 1: no split, no compression, a CRC32C per layer)."""

    name = "raw"
    codec_id = 2
    split_planes = False


CODECS = {ZstdPlanesCodec.name: ZstdPlanesCodec, RawCodec.name: RawCodec}


def make_codec(name: str, zstd_level: int = 1) -> Codec:
    """Instantiate the codec named ``name``."""
    return ZstdPlanesCodec(zstd_level) if name == ZstdPlanesCodec.name else CODECS[name]()


def layer_itemsize(spec: KVSpec, layer: int, codec: Codec) -> int:
    """Plane count of a layer: its element size if the codec splits planes and all the layer's
    tensors share one element size, else 1."""
    sizes = {t.itemsize for t in spec.layers[layer].tensors}
    return sizes.pop() if len(sizes) == 1 and codec.split_planes else 1


def encode_block(codec: Codec, fingerprint: bytes, spec: KVSpec, payload: np.ndarray, n_tokens: int,
                 key: bytes = b"", align: tuple[int, int] | None = None,
                 into: Callable[[int], memoryview | None] | None = None) -> bytes | memoryview:
    """Encode a block payload (uint8, ``n_tokens * spec.bytes_per_token`` bytes) into one value.

    ``key``: the block key the value is stored under; it seeds the header checksum, so a value
    read from the wrong place (another block's value) fails its header check.
    ``align``: ``(page, shift)``: pad the header so that the planes start at a value offset ``o``
    with ``(o + shift) % page == 0``, where the store puts a value's first byte ``shift`` bytes
    into a page of its file (``SSDStore.value_alignment``); None: no padding. Values whose planes
    fill fewer than 16 pages are not padded: the padding would cost more than a sixteenth of
    them, and reads that small gain nothing from O_DIRECT.
    ``into``: asked for a writable buffer of the value's size; the value is copied into it and
    a view of it returned. Where it is None, or returns None, the value is a new ``bytes``."""
    aligned = align is not None and payload.size >= 16 * align[0]
    page, shift = align if aligned else (1, 0)
    if not (0 < page <= _MAX_PAGE and page & (page - 1) == 0):
        raise ValueError(f"alignment page must be a power of two up to {_MAX_PAGE} bytes, got {page}")
    table, frames, at = [], [], 0   # at: bytes of frames (and gaps) so far
    min_ratio = getattr(codec, "min_ratio", 1.0)
    for layer in range(spec.num_layers):
        start, end = spec.layer_span(layer, n_tokens)
        data = payload[start:end]
        if codec.split_planes:
            k = layer_itemsize(spec, layer, codec)
            planes = data.reshape(-1, k).T if k > 1 else data.reshape(1, -1)
            if _planes_worth_trying(codec, layer):
                coded = [codec.encode_plane(np.ascontiguousarray(p)) for p in planes]
                paid = sum(len(c) for c in coded) * min_ratio <= data.size
                _remember(codec, layer, paid)
            else:
                paid = False
            if paid:
                table.append(struct.pack("<BB", k, _MODE_PLANES))
                for c in coded:
                    table.append(_PLANE.pack(len(c), 0 if codec.checksum_in_frame else crc32c(c)))
                frames += coded
                at += sum(len(c) for c in coded)
                continue
        stored = memoryview(data)  # copied once, by the join below
        table.append(struct.pack("<BB", 1, _MODE_STORED) + _PLANE.pack(len(stored), crc32c(stored)))
        gap = -at % page  # a stored layer starts on a page (after any compressed layer)
        if gap:
            frames.append(bytes(gap))
        frames.append(stored)
        at += gap + len(stored)
    flags, ext, pad = 0, b"", b""
    if aligned:
        size = _HEAD.size + _ALIGN_EXT.size + sum(map(len, table)) + _U32.size
        flags, pad = _ALIGNED, bytes(-(size + shift) % page)
        ext = _ALIGN_EXT.pack(page, len(pad))
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, codec.codec_id, flags, fingerprint, n_tokens, spec.num_layers)
    head += ext + b"".join(table)
    parts = [head, _U32.pack(crc32c(head, crc32c(key))), pad] + frames
    out = into(sum(map(len, parts))) if into is not None else None
    if out is None:
        return b"".join(parts)
    at = 0
    for part in parts:
        out[at:at + len(part)] = part
        at += len(part)
    return out


def _planes_worth_trying(codec: Codec, layer: int) -> bool:
    """Whether to compress ``layer``'s planes in this block: no, while the layer is in its skip
    after failing to pay (``_remember``). A hint kept per codec: threads encoding at once may
    race on it, which costs at most a compression tried or skipped."""
    failures, skip = codec.__dict__.setdefault("_tries", {}).get(layer, (0, 0))
    if skip:
        codec.__dict__["_tries"][layer] = (failures, skip - 1)
        return False
    return True


def _remember(codec: Codec, layer: int, paid: bool) -> None:
    """After f failures in a row, skip the next ``2**f - 1`` blocks (at most ``_MAX_SKIP``)."""
    tries = codec.__dict__.setdefault("_tries", {})
    failures = 0 if paid else min(tries.get(layer, (0, 0))[0] + 1, 8)
    tries[layer] = (failures, min(2 ** failures - 1, _MAX_SKIP))


#: ``read_at(offset, buffers, nbytes)``: fill ``buffers`` (writable, C-contiguous; ``nbytes`` in
#: all, which the caller knows) from the value's bytes at ``offset`` onwards, exactly, or raise
#: CorruptValueError
ReadAt = Callable[[int, Sequence[object], int], None]


@dataclass
class ParsedBlock:
    """A value whose header checked out; planes are still unverified.

    ``buf`` is the value as LMDB returns it (a view of its map). When ``read_at`` is set, plane
    bytes are read through it (``pread`` on the data file) and ``buf`` is never touched: faulting a
    cold value in through the map costs a page fault per 4 KiB and a read-around window per fault.
    """

    n_tokens: int
    #: per layer: (planes k, mode, [(offset, length, crc32c) per plane])
    layers: list[tuple[int, int, list[tuple[int, int, int]]]]
    buf: memoryview
    read_at: ReadAt | None = None
    #: the value's size in bytes (as stored)
    nbytes: int = 0


def header_bound(spec: KVSpec, codec: Codec) -> int:
    """An upper bound on the header size of any value of ``spec`` under ``codec``."""
    planes = sum(layer_itemsize(spec, i, codec) if codec.split_planes else 1 for i in range(spec.num_layers))
    return _HEAD.size + _ALIGN_EXT.size + 2 * spec.num_layers + planes * _PLANE.size + _U32.size


def parse_block(buf: memoryview | bytes | int, fingerprint: bytes, spec: KVSpec, codec: Codec,
                max_tokens: int, head: bytes | None = None, read_at: ReadAt | None = None,
                key: bytes = b"") -> ParsedBlock:
    """Check a value's header against the store and return where its planes are.

    ``head``: the value's first bytes (at least ``header_bound``, or all of it), already read; the
    header is then parsed from it and only ``len(buf)`` is taken from ``buf`` (an int is taken as
    the length). ``read_at`` is kept on the result for reading planes. ``key``: the block key the
    value was stored under (``encode_block``'s).

    Raises:
        CorruptValueError: bad magic, version, codec, fingerprint, sizes or header checksum.
    """
    total = buf if isinstance(buf, int) else len(buf)
    buf = memoryview(head if head is not None else buf)
    try:
        magic, version, codec_id, flags, fp, n_tokens, n_layers = _HEAD.unpack_from(buf, 0)
        if magic != MAGIC or version != FORMAT_VERSION:
            raise CorruptValueError("not a tierkv block of this format version")
        if fp != fingerprint:
            raise CorruptValueError("block belongs to another model, layout or codec")
        if codec_id != codec.codec_id or n_layers != spec.num_layers or not 0 < n_tokens <= max_tokens:
            raise CorruptValueError("block header does not match the store")
        if flags & ~_ALIGNED:
            raise CorruptValueError("block header has unknown flags")
        pos, layers, page, pad = _HEAD.size, [], 1, 0
        if flags & _ALIGNED:
            page, pad = _ALIGN_EXT.unpack_from(buf, pos)
            if not (0 < page <= _MAX_PAGE and page & (page - 1) == 0 and pad < page):
                raise CorruptValueError("block header has a bad alignment")
            pos += _ALIGN_EXT.size
        for layer in range(n_layers):
            k, mode = struct.unpack_from("<BB", buf, pos)
            pos += 2
            ok = (mode == _MODE_STORED and k == 1) or (
                mode == _MODE_PLANES and codec.split_planes and k == layer_itemsize(spec, layer, codec))
            if not ok:
                raise CorruptValueError("block layer table does not match the spec")
            layers.append((k, mode, [_PLANE.unpack_from(buf, pos + i * _PLANE.size) for i in range(k)]))
            pos += k * _PLANE.size
        (crc,) = _U32.unpack_from(buf, pos)
        if crc != crc32c(buf[:pos], crc32c(key)):
            raise CorruptValueError("block header checksum mismatch")
        pos += _U32.size + pad
    except struct.error:
        raise CorruptValueError("block header truncated") from None
    placed, frames_at = [], pos
    for k, mode, planes in layers:
        if mode == _MODE_STORED:
            pos += -(pos - frames_at) % page  # the gap in front of an aligned stored layer
        row = []
        for length, pcrc in planes:
            row.append((pos, length, pcrc))
            pos += length
        placed.append((k, mode, row))
    if pos != total:
        raise CorruptValueError(f"block is {total} bytes, header describes {pos}")
    return ParsedBlock(n_tokens, placed, buf if head is None else memoryview(b""), read_at, total)


_scratch = threading.local()


def _frame(block: ParsedBlock, off: int, length: int) -> memoryview:
    """Plane bytes: a view of the map, or read into this thread's scratch buffer (valid until the
    thread's next read)."""
    if block.read_at is None:
        return block.buf[off:off + length]
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < length:
        buf = _scratch.buf = bytearray(max(length, 1 << 20))
    view = memoryview(buf)[:length]
    block.read_at(off, [view], length)
    return view


def read_stored_layer(block: ParsedBlock, layer: int, dsts: Sequence[np.ndarray]) -> bool:
    """Read a stored-mode layer straight into ``dsts`` and verify its CRC32C.

    ``dsts``: C-contiguous uint8 arrays, in the layer's byte order, whose sizes add up to the
    layer. Returns False (nothing read) when the layer was encoded in planes or the block has no
    ``read_at``; the caller then decodes through ``iter_layer_planes``. On a checksum failure the
    destinations hold garbage and CorruptValueError is raised.
    """
    k, mode, planes = block.layers[layer]
    if mode != _MODE_STORED or block.read_at is None:
        return False
    off, length, crc = planes[0]
    if sum(d.nbytes for d in dsts) != length:
        raise CorruptValueError("stored layer length mismatch")
    block.read_at(off, dsts, length)
    c = 0
    for d in dsts:
        c = crc32c(d, c)
    if c != crc:
        raise CorruptValueError("stored layer checksum mismatch")
    return True


def layers_span(block: ParsedBlock, layers: range) -> tuple[int, int]:
    """(value offset, length) of the bytes of consecutive layers, every plane of each (and any
    alignment gap between them)."""
    first, last = block.layers[layers[0]][2][0], block.layers[layers[-1]][2][-1]
    return first[0], last[0] + last[1] - first[0]


def stored_span(block: ParsedBlock, layers: range) -> tuple[int, int] | None:
    """(value offset, length) of consecutive layers that are all stored as they are (mode 1),
    so one read fills them; None if any is split into planes."""
    if any(block.layers[layer][1] != _MODE_STORED for layer in layers):
        return None
    return layers_span(block, layers)


def read_stored_layers(block: ParsedBlock, layers: range, dsts: Sequence[Sequence[np.ndarray]], read: ReadAt) -> None:
    """Read consecutive stored-mode layers (``stored_span``) with one ``read`` (a ReadAt: the
    value's ``read_at`` or its O_DIRECT form) into ``dsts`` (per layer, as in
    ``read_stored_layer``), then verify each layer's CRC32C.

    Raises:
        CorruptValueError: a layer's size or checksum does not match (its destinations then hold
            garbage).
    """
    span = stored_span(block, layers)
    if span is None:
        raise CorruptValueError("layers are not stored as they are")
    for layer, ds in zip(layers, dsts):
        if sum(d.nbytes for d in ds) != block.layers[layer][2][0][1]:
            raise CorruptValueError("stored layer length mismatch")
    read(span[0], [d for ds in dsts for d in ds], span[1])
    for layer, ds in zip(layers, dsts):
        c = 0
        for d in ds:
            c = crc32c(d, c)
        if c != block.layers[layer][2][0][2]:
            raise CorruptValueError("stored layer checksum mismatch")


def iter_layer_planes(codec: Codec, block: ParsedBlock, layer: int, layer_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
    """Verify and decode the byte planes of one layer, yielding ``(plane index, uint8 plane)``.

    Raises:
        CorruptValueError: a plane fails its checksum or expands to the wrong size.
    """
    k, mode, planes = block.layers[layer]
    if layer_bytes % k:
        raise CorruptValueError("layer size is not a multiple of its element size")
    size = layer_bytes // k
    frames = None
    if block.read_at is not None and len(planes) > 1:
        # a layer's planes lie back to back: one read for all of them, not one per plane
        first, length = layers_span(block, range(layer, layer + 1))
        span = _frame(block, first, length)
        frames = [span[off - first:off - first + length] for off, length, _ in planes]
    for j, (off, length, crc) in enumerate(planes):
        frame = frames[j] if frames is not None else _frame(block, off, length)
        if mode == _MODE_STORED:
            if length != size or crc32c(frame) != crc:
                raise CorruptValueError("stored layer checksum or length mismatch")
            yield j, np.frombuffer(frame, dtype=np.uint8)
            continue
        if not codec.checksum_in_frame and crc32c(frame) != crc:
            raise CorruptValueError("plane checksum mismatch")
        yield j, np.frombuffer(codec.decode_plane(frame, size), dtype=np.uint8)


def decode_layer(codec: Codec, block: ParsedBlock, layer: int, out: np.ndarray) -> None:
    """Decode one layer of a parsed block into ``out`` (uint8, exactly the layer's bytes).

    Raises:
        CorruptValueError: a plane fails its checksum or expands to the wrong size.
    """
    if read_stored_layer(block, layer, [out]):
        return
    k = block.layers[layer][0]
    if k == 2 and _LITTLE:
        (_, lo), (_, hi) = iter_layer_planes(codec, block, layer, out.size)
        join_byte_pair(lo, hi, out.view(np.uint16))
        return
    grid = out.reshape(-1, k) if k > 1 else None
    for j, plane in iter_layer_planes(codec, block, layer, out.size):
        if grid is None:
            out[:] = plane
        else:
            grid[:, j] = plane


def join_byte_pair(lo: np.ndarray, hi: np.ndarray, out: np.ndarray) -> None:
    """Join two byte planes into 2-byte elements: ``out = hi << 8 | lo``, on a little-endian
    machine the bytes ``lo, hi`` of each element (bf16 or fp16 KV).

    ``out``: uint16, the planes' shape, any strides (a view of a result tensor). Two passes over
    whole elements instead of a byte-wise write at a stride of 2, and numpy releases the GIL for
    both: with it a bf16 block decodes 1.22x faster on one core (``bench/codec_choice.py``, see
    docs/benchmarks.md, "Codec choice").
    """
    np.left_shift(hi, 8, out=out, dtype=np.uint16)
    np.bitwise_or(out, lo, out=out)
