"""Typed, validated configuration.

Primitives: ``parse_size`` (``"8GiB"`` → bytes), ``TierKVConfig`` (frozen, checked once at
construction). The library reads no environment variables; only the CLI does.
"""

from __future__ import annotations

import numbers
import re
import threading
from dataclasses import dataclass, fields

import torch

from .affinity import AFFINITIES
from .errors import ConfigError

__all__ = ["parse_size", "format_size", "is_int", "check_timeout", "check_device", "TierKVConfig", "PERSIST_MODES",
           "BLOCK_TOKENS"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
    "p": 10**15, "pb": 10**15, "pib": 2**50,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")

PERSIST_MODES = ("write_back", "write_through")
PAGE_CACHE_MODES = ("use", "bypass")
#: names of the SSD codecs (tierkv/codec.py implements them; a test keeps the two in step)
SSD_CODECS = ("zstd-planes", "raw")


def parse_size(value: int | str, name: str = "size") -> int:
    """Return a byte count from an int or a string such as ``"8GiB"``, ``"512MB"`` or ``"0"``.

    Binary units (KiB, MiB, GiB, TiB, PiB) are powers of 1024; decimal ones (KB, MB, GB, TB, PB) of
    1000.

    Raises:
        ConfigError: the value is negative, not a number or has an unknown unit.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a byte count or a size string, not a bool")
    if isinstance(value, numbers.Integral):  # numpy's ints too
        if value < 0:
            raise ConfigError(f"{name} must be >= 0 bytes, got {value}")
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(
                f"{name}={value!r} is not a size; write an int or a string like '512MiB' or '8GB'"
            )
        return int(float(m.group(1)) * _UNITS[unit])
    raise ConfigError(f"{name} must be an int or a size string, got {type(value).__name__}")


def is_int(value: object) -> bool:
    """An int as a count or size from a caller: numpy's ints too, a bool (an int to Python) not."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_timeout(timeout: object) -> float | None:
    """A wait's ``timeout``: ``None`` (wait as long as it takes) or seconds (<= 0: do not wait).
    Infinity, or any time longer than a thread wait can take (``threading.TIMEOUT_MAX``), is
    ``None``: passed on, it raised ``OverflowError``.

    Raises:
        ConfigError: not a number, a bool, or NaN.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout != timeout:
        raise ConfigError(f"timeout must be None or a number of seconds, got {timeout!r}")
    return None if timeout >= threading.TIMEOUT_MAX else float(timeout)


def check_needed_from(needed_from: object, num_layers: int, name: str = "needed_from") -> list[int] | None:
    """A restore's ``needed_from``: ``None``, an int (every layer) or one int per layer, each the
    first token the caller needs of that layer. Returns one int per layer, or ``None`` where
    every layer needs every token.

    Raises:
        ConfigError: not an int >= 0, or not a sequence of ``num_layers`` of them.
    """
    if needed_from is None:
        return None
    given = [needed_from] * num_layers if is_int(needed_from) else needed_from
    if not isinstance(given, (list, tuple)) or not all(is_int(x) for x in given):
        raise ConfigError(f"{name} must be None, an int or a list of {num_layers} ints (one per layer), "
                          f"got {needed_from!r:.80}")
    needed = [int(x) for x in given]
    if len(needed) != num_layers or any(x < 0 for x in needed):
        raise ConfigError(f"{name} must name a token >= 0 for each of the {num_layers} layers, "
                          f"got {needed_from!r:.80}")
    return needed if any(needed) else None


def check_device(device: object, name: str = "device") -> torch.device:
    """A device KV can be restored to or kept on: the CPU, or a CUDA GPU this process can use.

    Raises:
        ConfigError: not a torch device, another kind of device (``"meta"``, ``"mps"``), or CUDA
            asked for where there is none (or no GPU of that index).
    """
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"{name}={device!r} is not a torch device: {str(e).splitlines()[0]}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{name}={device!r} but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{name}={device!r}: this process sees {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise ConfigError(f"{name}={device!r}: tierkv keeps and restores KV on the CPU or a CUDA GPU")
    return dev


#: the block sizes a store takes, in tokens (lowest, highest)
BLOCK_TOKENS = (16, 4096)


def _int_in(value: object, lo: int, hi: int) -> bool:
    """A plain int in ``lo..hi``, not a bool: a setting, which goes into the store's JSON as it is."""
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def format_size(n: float) -> str:
    """Format a byte count with a binary unit, e.g. ``1.50 GiB``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class TierKVConfig:
    """Settings of a :class:`tierkv.TierKV` store.

    Attributes:
        device_bytes: budget of the device tier (GPU memory; a CPU pool without CUDA). 0 disables it.
        host_bytes: budget of the host DRAM tier. 0 disables it.
        ssd_bytes: budget of encoded block bytes in the LMDB store on SSD (must be > 0). A store
            reopened with a lower budget than it holds evicts down to it at its next write
            (data.mdb keeps its size: LMDB reuses the freed pages but never shrinks the file).
        block_tokens: tokens per block, 16..4096. A block is the unit a session is stored, shared
            and evicted in, and a restore reads each block layer by layer: reads under 512 KiB
            restored slower on the test machine (``tierkv calc MODEL --block-tokens N`` prints a
            layout's; docs/benchmarks.md, "Choosing a block size"). Part of a store's identity:
            a store is opened with the block size it was made with.
        persist: ``"write_back"`` (blocks reach SSD when demoted, and on ``close()``) or
            ``"write_through"`` (every save is also written to SSD in the background).
        device: torch device of the device tier, e.g. ``"cuda:0"`` or ``"cpu"``; ``None`` picks
            CUDA when present, else the CPU.
        ssd_codec: codec of values on SSD (``"zstd-planes"`` lossless, or ``"raw"``).
        zstd_level: compression level of the ``zstd-planes`` codec. Its match finder looks for long
            matches only (``ZstdPlanesCodec.long_matches_only``), so levels above 1 gain little on KV;
            negative levels store literals uncompressed and so barely compress KV at all.
        io_threads: threads decoding blocks read from SSD.
        ssd_page_cache: ``"use"`` (the default): reads and writes of the SSD tier go through the
            kernel's page cache, which keeps what they touched until it needs the memory.
            ``"bypass"``: a load reads each cold value it wants whole with O_DIRECT, in file
            order, into a reused bounce buffer, and decodes it from there into any destination;
            a restore that needs only some of a block's layers (``needed_from``) reads runs of
            stored layers with O_DIRECT straight into page-aligned memory the caller allocated,
            the rest through the page cache, which it then drops; the writer drops the values
            it wrote once they are durable. For a server that keeps far more KV on SSD than it
            has memory. O_DIRECT needs a file system that has it (else reads stay buffered);
            see docs/integration.md.
        io_affinity: ``"spread"`` gives each I/O thread its own slice of the CPUs the process may
            run on, so a restore's decode threads do not start out sharing one CPU (with more
            threads than CPUs, they take one CPU each in turn; see ``tierkv.affinity``);
            ``"inherit"`` leaves them on the process's whole CPU set.
        pin_host_memory: page-lock host buffers; ``None`` means "when CUDA is available" (True
            without CUDA is a ConfigError at open). Either way, full blocks in CPU memory come
            from slabs a background thread makes ready ahead of saves: page-locked, or else plain
            memory prefaulted (``tierkv.hostmem``).
        nan_policy: ``"store"`` keeps NaN/Inf values as they are (bit-exact); ``"refuse"`` makes
            ``save`` raise SpecMismatchError on any (one extra pass over the KV).
        full_policy: when the SSD is full of data that cannot be evicted, ``"raise"`` reports
            StoreFullError through the save's handle and ``flush()``; ``"miss"`` drops that save
            silently (counted in ``stats()["dropped_saves"]``): a later lookup simply misses.
    """

    device_bytes: int | str = "1GiB"
    host_bytes: int | str = "4GiB"
    ssd_bytes: int | str = "64GiB"
    block_tokens: int = 256
    persist: str = "write_back"
    device: str | None = None
    ssd_codec: str = "zstd-planes"
    zstd_level: int = 1
    io_threads: int = 2
    ssd_page_cache: str = "use"
    io_affinity: str = "spread"
    pin_host_memory: bool | None = None
    nan_policy: str = "store"
    full_policy: str = "raise"

    def __post_init__(self) -> None:
        for name in ("device_bytes", "host_bytes", "ssd_bytes"):
            object.__setattr__(self, name, parse_size(getattr(self, name), name))
        if self.ssd_bytes <= 0:
            raise ConfigError("ssd_bytes must be > 0: the SSD tier is where sessions persist")
        if not _int_in(self.block_tokens, *BLOCK_TOKENS):
            raise ConfigError(f"block_tokens must be an int in {BLOCK_TOKENS[0]}..{BLOCK_TOKENS[1]}, "
                              f"got {self.block_tokens!r}")
        if self.persist not in PERSIST_MODES:
            raise ConfigError(f"persist must be one of {PERSIST_MODES}, got {self.persist!r}")
        if self.full_policy not in ("raise", "miss"):
            raise ConfigError(f"full_policy must be 'raise' or 'miss', got {self.full_policy!r}")
        if self.nan_policy not in ("store", "refuse"):
            raise ConfigError(f"nan_policy must be 'store' or 'refuse', got {self.nan_policy!r}")
        if not _int_in(self.io_threads, 1, 64):
            raise ConfigError(f"io_threads must be an int in 1..64, got {self.io_threads!r}")
        if self.ssd_page_cache not in PAGE_CACHE_MODES:
            raise ConfigError(f"ssd_page_cache must be one of {list(PAGE_CACHE_MODES)}, got {self.ssd_page_cache!r}")
        if self.io_affinity not in AFFINITIES:
            raise ConfigError(f"io_affinity must be one of {list(AFFINITIES)}, got {self.io_affinity!r}")
        if not _int_in(self.zstd_level, -7, 22):
            raise ConfigError(f"zstd_level must be an int in -7..22, got {self.zstd_level!r}")
        if self.ssd_codec not in SSD_CODECS:
            raise ConfigError(f"ssd_codec must be one of {list(SSD_CODECS)}, got {self.ssd_codec!r}")
        if not (self.pin_host_memory is None or isinstance(self.pin_host_memory, bool)):
            raise ConfigError(f"pin_host_memory must be None, True or False, got {self.pin_host_memory!r}")
        if self.device is not None:
            check_device(self.device)

    @classmethod
    def from_settings(cls, **settings: object) -> "TierKVConfig":
        """Build a config from keyword settings, naming any unknown one."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**settings)  # type: ignore[arg-type]
