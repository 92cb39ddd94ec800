"""Token ids and block keys.

Primitives:
    as_tokens: normalise token ids (list, numpy or torch, 1-D) to a little-endian uint32 array.
    chain_seed: the per-store, per-tenant seed of every key chain.
    block_keys / iter_block_keys: the chained blake2b-128 keys of a token sequence's blocks.

A full block's key hashes its parent's key and its own token ids, so equal keys mean equal
prefixes (up to a 128-bit collision), whatever process computed them: never the built-in hash function,
no dependence on PYTHONHASHSEED. A trailing partial block is hashed in a separate domain so it
never collides with a full block.
"""

from __future__ import annotations

import ctypes
import hashlib
import threading
from typing import Any, Iterator

import numpy as np

from .errors import ConfigError, SpecMismatchError

__all__ = ["as_tokens", "tokens_view", "common_prefix", "chain_seed", "block_keys", "iter_block_keys", "KEY_BYTES"]

KEY_BYTES = 16
_TOKEN_DTYPE = np.dtype("<u4")


def as_tokens(tokens: Any) -> np.ndarray:
    """Return ``tokens`` as a read-only 1-D ``<u4`` array.

    Raises:
        SpecMismatchError: not 1-D, not integers, or an id outside 0..2**32-1.
    """
    if hasattr(tokens, "detach"):  # torch.Tensor, without importing torch here
        try:
            tokens = tokens.detach().cpu().numpy()
        except (RuntimeError, NotImplementedError, TypeError) as e:  # a meta tensor, a sparse one
            raise SpecMismatchError(f"token ids: cannot read this tensor on the CPU: {e}") from None
    arr = np.asarray(tokens)
    if arr.ndim == 0:
        raise SpecMismatchError(
            f"token ids must be a 1-D sequence of ints (list, numpy or torch), got {type(tokens).__name__}")
    if arr.ndim != 1:
        raise SpecMismatchError(f"token ids must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, _TOKEN_DTYPE)
    if arr.dtype.kind not in "iu":
        raise SpecMismatchError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.dtype != _TOKEN_DTYPE:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= 2**32:
            raise SpecMismatchError(f"token ids must be in 0..2**32-1, got range [{lo}, {hi}]")
        arr = arr.astype(_TOKEN_DTYPE)
    arr = np.ascontiguousarray(arr)
    arr.flags.writeable = False
    return arr


_scratch = threading.local()


def tokens_view(tokens: Any) -> np.ndarray:
    """Like ``as_tokens``, for a comparison made at once: a 1-D int64/int32 torch tensor is
    checked with one ``aminmax`` and converted into this thread's scratch buffer (valid until
    its next call). A 1M-token lookup then allocates nothing: a fresh 4 MB array costs a page
    fault per 4 KiB on every call (bench/ops.py measures the lookup)."""
    t = tokens.detach() if hasattr(tokens, "detach") else None
    if (t is None or t.device.type != "cpu" or str(t.layout) != "torch.strided" or t.dim() != 1
            or not t.numel() or str(t.dtype) not in ("torch.int64", "torch.int32")):
        return as_tokens(tokens)
    lo, hi = (int(x) for x in t.aminmax())
    if lo < 0 or hi >= 2**32:
        raise SpecMismatchError(f"token ids must be in 0..2**32-1, got range [{lo}, {hi}]")
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < t.numel():
        buf = _scratch.buf = t[:1].int().new_empty(max(t.numel(), 1 << 16))
    out = buf[:t.numel()]
    out.copy_(t)  # int64 -> int32 wraps, read back as uint32: exact for 0..2**32-1
    return out.numpy().view(_TOKEN_DTYPE)


def _libc_memcmp() -> Any:
    try:
        fn = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError, TypeError):  # no C library to look into (e.g. Windows)
        return None
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


_memcmp = _libc_memcmp()


def common_prefix(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 16) -> int:
    """Length of the common prefix of two token arrays (compared in chunks: no large temporary,
    and it stops at the first differing chunk).

    Equal prefixes, the usual case of a session's next turn, are compared with one ``memcmp``
    first, a single pass with no temporaries (bench/ops.py times a 1M-token session's lookup).
    """
    m = min(len(a), len(b))
    if (_memcmp is not None and m and a.dtype == b.dtype and a.flags.c_contiguous and b.flags.c_contiguous
            and _memcmp(a.ctypes.data, b.ctypes.data, m * a.itemsize) == 0):
        return m
    for i in range(0, m, chunk):
        x, y = a[i:min(i + chunk, m)], b[i:min(i + chunk, m)]
        if not np.array_equal(x, y):
            return i + int(np.argmax(x != y))
    return m


def chain_seed(fingerprint: bytes, tenant: str | None) -> bytes:
    """Seed of a key chain: the store fingerprint salted by the tenant (``None`` = shared)."""
    if tenant is not None and (not isinstance(tenant, str) or not tenant or len(tenant) > 256):
        raise ConfigError("tenant must be a non-empty string of at most 256 characters")
    # surrogatepass, as for session ids (records.py): a str Python holds is a tenant, and any
    # other str encodes to the same bytes as with plain UTF-8
    salt = b"\x00" if tenant is None else b"\x01" + tenant.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(fingerprint + salt, digest_size=KEY_BYTES, person=b"tierkv-seed").digest()


def block_keys(seed: bytes, tokens: np.ndarray, block_tokens: int, partial: bool = True) -> list[bytes]:
    """Keys of the blocks of ``tokens``: one per full block, plus the trailing partial one if asked.

    Args:
        seed: ``chain_seed(...)``.
        tokens: output of ``as_tokens``.
        block_tokens: tokens per full block.
        partial: also key the trailing partial block (if the length is not a multiple).
    """
    return list(iter_block_keys(seed, tokens, block_tokens, partial))


def iter_block_keys(seed: bytes, tokens: np.ndarray, block_tokens: int, partial: bool = True) -> Iterator[bytes]:
    """``block_keys`` as a generator, so a lookup can stop hashing at its first miss."""
    prev = seed
    n_full = len(tokens) // block_tokens
    data = memoryview(tokens).cast("B")  # byte offsets, whatever the element type
    step = block_tokens * _TOKEN_DTYPE.itemsize
    for i in range(n_full):
        prev = hashlib.blake2b(prev, digest_size=KEY_BYTES, person=b"tierkv-full")
        prev.update(data[i * step:(i + 1) * step])
        prev = prev.digest()
        yield prev
    if partial and len(tokens) % block_tokens:
        h = hashlib.blake2b(prev, digest_size=KEY_BYTES, person=b"tierkv-part")
        h.update(data[n_full * step:])
        yield h.digest()
