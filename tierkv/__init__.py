"""tierkv: keep LLM KV caches alive across GPU memory, host DRAM and SSD.

The public API is what ``__all__`` lists; every other module is internal.
"""

from .cachepool import CachePool
from .config import TierKVConfig, parse_size
from .engine import TierKV
from .errors import (BackgroundError, BlockLoadError, BudgetExceededError, ColdReadError, ConfigError,
                     ForeignStoreError, ForkedProcessError, SpecMismatchError, StoreClosedError,
                     StoreFullError, StoreIOError, TierKVError, UnknownSessionError)
from .handles import LoadHandle, RestoredKV, SaveHandle
from .spec import KVSpec, LayerSpec, TensorSpec

__version__ = "0.1.0"

__all__ = [
    "TierKV", "TierKVConfig", "KVSpec", "LayerSpec", "TensorSpec", "RestoredKV", "SaveHandle",
    "LoadHandle", "CachePool", "parse_size",
    "TierKVError", "ConfigError", "SpecMismatchError", "UnknownSessionError", "ForeignStoreError",
    "StoreFullError", "BudgetExceededError", "StoreClosedError", "ForkedProcessError", "StoreIOError",
    "BackgroundError",
    "BlockLoadError", "ColdReadError", "__version__",
]
