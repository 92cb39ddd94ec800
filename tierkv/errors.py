"""tierkv's exception hierarchy.

Every error tierkv raises derives from :class:`TierKVError` and says what to do about it.
Foreign exceptions (LMDB's, zstd's, OS errors) are translated at the edge of the module that
meets them, so callers catch one tree.

Primitives: TierKVError, ConfigError, SpecMismatchError, UnknownSessionError, ForeignStoreError,
StoreFullError, BudgetExceededError, StoreClosedError, ForkedProcessError, StoreIOError,
BackgroundError, BlockLoadError, ColdReadError.
"""

from __future__ import annotations

__all__ = [
    "TierKVError",
    "ConfigError",
    "SpecMismatchError",
    "UnknownSessionError",
    "ForeignStoreError",
    "StoreFullError",
    "BudgetExceededError",
    "StoreClosedError",
    "ForkedProcessError",
    "StoreIOError",
    "BackgroundError",
    "BlockLoadError",
    "ColdReadError",
]


class TierKVError(Exception):
    """Base class of every error tierkv raises."""


class ConfigError(TierKVError, ValueError):
    """A setting, size string or argument is invalid."""


class SpecMismatchError(TierKVError, ValueError):
    """KV tensors or token ids do not match the store's KVSpec (shape, dtype, length, device)."""


class UnknownSessionError(TierKVError, KeyError):
    """The named session does not exist (never saved, dropped, evicted or expired)."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "unknown session"


class ForeignStoreError(TierKVError):
    """The store on disk belongs to another model, layout or tierkv format version."""


class StoreFullError(TierKVError):
    """The SSD tier cannot take more data even after evicting everything evictable."""


class BudgetExceededError(TierKVError):
    """Pinned sessions alone need more bytes than a tier's budget allows."""


class StoreClosedError(TierKVError):
    """The store was used after ``close()``."""


class ForkedProcessError(StoreClosedError):
    """A TierKV was used in a process forked from the one that opened it: LMDB environments and
    the engine's threads do not survive ``fork``. Open the store in each process after forking,
    or start workers with multiprocessing's ``"spawn"`` or ``"forkserver"`` method."""


class StoreIOError(TierKVError):
    """The underlying LMDB environment or file system failed."""


class BackgroundError(TierKVError):
    """A background thread (writer, demoter or loader) failed; the cause is chained."""


class BlockLoadError(TierKVError):
    """A block failed to load (checksum, header or I/O) while a caller waited on it.

    Attributes:
        first_bad_token: index of the first token whose KV could not be delivered.
    """

    def __init__(self, message: str, first_bad_token: int) -> None:
        super().__init__(message)
        self.first_bad_token = first_bad_token


class ColdReadError(TierKVError):
    """A file's pages stayed in the page cache after they were dropped, so a read of it would
    come from memory, not from the disk: the file lies on a file system kept in memory (tmpfs,
    ramfs), or a mapping of it is still open. Benchmarks raise it rather than report a warm read
    as a cold one; point them at a directory on the disk to be measured."""
