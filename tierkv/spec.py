"""KV layout of a model: what tensors each layer keeps per token.

Primitives:
    TensorSpec: one cached tensor of a layer (its per-token dims, token axis and dtype).
    LayerSpec: the tensors one layer caches (key + value for GQA/MHA, one latent for MLA).
    KVSpec: all layers of a model plus its identity; ``fingerprint`` seeds every block key.
    config_digest: a digest of what a transformers config says a model's layers compute, for
        the integrations to put into a spec's identity (a RoPE override changes every key).

A tensor holding ``T`` tokens has shape ``dims`` with ``T`` inserted at ``seq_axis``: a GQA key
with ``dims=(kv_heads, head_dim), seq_axis=1`` is ``[kv_heads, T, head_dim]``, the layout of a
transformers cache without its batch axis; an MLA latent with ``dims=(576,), seq_axis=0`` is
``[T, 576]``. A block's payload is every layer's tensors for its tokens, layer after layer, each
tensor C-contiguous in that shape; so every offset is a token count times a per-token byte count.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .config import is_int
from .errors import ConfigError, SpecMismatchError

__all__ = ["TensorSpec", "LayerSpec", "KVSpec", "DTYPES", "FORMAT_VERSION", "config_digest"]

#: On-disk format version; part of every fingerprint, so a new format never reads an old one.
FORMAT_VERSION = 3

#: Dtypes a KV tensor may have, by canonical name.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}


def _check_layer_count(num_layers: Any) -> None:
    if not is_int(num_layers) or num_layers < 1:
        raise ConfigError(f"num_layers must be an int >= 1, got {num_layers!r}")


# Config fields that say where a model was loaded from, how it is run or what its heads output,
# not what its layers compute (keys starting with "_" are runtime state: _name_or_path, ...).
# The KV dtype is part of the spec itself.
_CONFIG_NOT_KV = frozenset({
    "transformers_version", "name_or_path", "dtype", "torch_dtype", "use_cache", "return_dict",
    "output_attentions", "output_hidden_states", "architectures", "id2label", "label2id", "problem_type",
    "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "decoder_start_token_id",
    "tie_word_embeddings", "chunk_size_feed_forward"})


def config_digest(config: Any, ignore: frozenset[str] = _CONFIG_NOT_KV) -> str:
    """A digest (32 hex characters) of a transformers config, less the fields that change no
    layer's output (``ignore``, and keys starting with "_"): two loads of one model give the same
    digest, and a config override that changes the KV (``rope_parameters`` or ``rope_scaling``, an
    epsilon, an activation, a quantization config) gives another. Sets are hashed in a fixed
    order, not the per-process string hash order. Any config with ``to_dict`` will do (a PEFT
    adapter's, with its own ``ignore``)."""
    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): strip(x) for k, x in v.items() if not (isinstance(k, str) and (k.startswith("_") or k in ignore))}
        if isinstance(v, (list, tuple)):
            return [strip(x) for x in v]
        if isinstance(v, (set, frozenset)):  # in a fixed order, not the per-process hash order
            return sorted((strip(x) for x in v), key=repr)
        return v if v is None or isinstance(v, (str, int, float, bool)) else repr(v)

    doc = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    raw = json.dumps(strip(doc), sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(raw.encode(), digest_size=16, person=b"tierkv-config").hexdigest()


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical name of a supported dtype; raises ConfigError for others."""
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name in DTYPES:
            return name
    elif dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype]
    raise ConfigError(f"unsupported KV dtype {dtype!r}; supported: {sorted(DTYPES)}")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a layer caches.

    Attributes:
        name: role of the tensor, e.g. ``"key"``, ``"value"``, ``"latent"``.
        dims: sizes of the non-token axes, in order.
        seq_axis: where the token axis goes among them (0..len(dims)).
        dtype: canonical dtype name (see ``DTYPES``).
    """

    name: str
    dims: tuple[int, ...]
    seq_axis: int
    dtype: str
    # sizes are fixed at construction and read on every restore's hot path (per block and
    # layer): computed once here, not per call
    _bytes_per_token: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Sizes must be ints as given: int(8.5) would quietly make a head_dim of 8, and a bool
        # is an int to Python but never a size meant as one.
        dims = self.dims if isinstance(self.dims, (tuple, list)) else None
        if dims is None or not all(is_int(d) for d in dims) or not is_int(self.seq_axis):
            raise ConfigError(f"tensor {self.name!r}: dims must be a tuple of ints and seq_axis an int, "
                              f"got dims={self.dims!r}, seq_axis={self.seq_axis!r}")
        object.__setattr__(self, "dims", tuple(int(d) for d in dims))
        object.__setattr__(self, "seq_axis", int(self.seq_axis))
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if any(d <= 0 for d in self.dims):
            raise ConfigError(f"tensor {self.name!r}: dims must be positive, got {self.dims}")
        if not 0 <= self.seq_axis <= len(self.dims):
            raise ConfigError(f"tensor {self.name!r}: seq_axis {self.seq_axis} outside 0..{len(self.dims)}")
        object.__setattr__(self, "_bytes_per_token", math.prod(self.dims) * _ITEMSIZE[self.dtype])

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        return self._bytes_per_token

    def shape(self, n_tokens: int) -> tuple[int, ...]:
        """Shape of this tensor holding ``n_tokens`` tokens."""
        d = list(self.dims)
        d.insert(self.seq_axis, n_tokens)
        return tuple(d)


@dataclass(frozen=True)
class LayerSpec:
    """The tensors one layer caches, in the order the caller passes them."""

    tensors: tuple[TensorSpec, ...]
    _bytes_per_token: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        if not self.tensors:
            raise ConfigError("a layer must cache at least one tensor")
        if not all(isinstance(t, TensorSpec) for t in self.tensors):
            raise ConfigError("a layer's tensors must be TensorSpec objects")
        object.__setattr__(self, "_bytes_per_token", sum(t.bytes_per_token for t in self.tensors))

    @property
    def bytes_per_token(self) -> int:
        return self._bytes_per_token


@dataclass(frozen=True)
class KVSpec:
    """Per-layer KV layout and identity of a model.

    Attributes:
        model_id: the model's name, e.g. ``"HuggingFaceTB/SmolLM2-135M-Instruct"``.
        layers: one LayerSpec per attention layer; layers may differ.
        revision: weights revision or checksum; KV from other weights never matches.
    """

    model_id: str
    layers: tuple[LayerSpec, ...]
    revision: str = ""
    _offsets: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)
    _bytes_per_token: int = field(init=False, repr=False, compare=False)
    _tensors: tuple[TensorSpec, ...] = field(init=False, repr=False, compare=False)
    _first_tensor: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _uniform: TensorSpec | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.model_id or not isinstance(self.model_id, str):
            raise ConfigError("KVSpec needs a non-empty model_id")
        if not self.layers:
            raise ConfigError("KVSpec needs at least one layer")
        if not all(isinstance(layer, LayerSpec) for layer in self.layers):
            raise ConfigError("KVSpec layers must be LayerSpec objects")
        if not isinstance(self.revision, str):
            raise ConfigError(f"KVSpec revision must be a str, got {type(self.revision).__name__}")
        offsets, acc = [], 0
        for i, layer in enumerate(self.layers):
            row, start = [], acc
            for t in layer.tensors:
                size = t.itemsize
                if acc % size or (acc - start) % size:
                    # a block holds n tokens of each tensor in turn: a tensor starting off its
                    # element size could not be viewed in place (torch refuses), at every save
                    raise ConfigError(f"layer {i}, tensor {t.name!r} ({t.dtype}) would start at byte {acc} per token "
                                      f"({acc - start} into its layer), not a multiple of its {size}-byte elements: "
                                      "put wider dtypes first, or pad the narrower tensors")
                row.append(acc)
                acc += t.bytes_per_token
            offsets.append(tuple(row))
        object.__setattr__(self, "_offsets", tuple(offsets))
        object.__setattr__(self, "_bytes_per_token", acc)
        tensors = tuple(t for layer in self.layers for t in layer.tensors)
        object.__setattr__(self, "_tensors", tensors)
        object.__setattr__(self, "_first_tensor", tuple(itertools.accumulate(
            (len(layer.tensors) for layer in self.layers[:-1]), initial=0)))
        first = tensors[0]
        same = all((t.dims, t.seq_axis, t.dtype) == (first.dims, first.seq_axis, first.dtype) for t in tensors)
        object.__setattr__(self, "_uniform", first if same else None)

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        """Every layer's tensors, layer after layer: the order they lie in a block payload."""
        return self._tensors

    def first_tensor(self, layer: int) -> int:
        """Index in ``tensors`` of ``layer``'s first tensor."""
        return self._first_tensor[layer]

    @property
    def uniform_tensor(self) -> TensorSpec | None:
        """The one tensor layout every layer's every tensor has (dims, token axis, dtype), or
        None when they differ: then a block payload is a stack of equal tensors."""
        return self._uniform

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def gqa(cls, model_id: str, num_layers: int, kv_heads: int, head_dim: int,
            dtype: torch.dtype | str = torch.bfloat16, v_head_dim: int | None = None,
            revision: str = "") -> "KVSpec":
        """Grouped-query (or multi-head) attention: a key and a value ``[kv_heads, T, head_dim]``."""
        _check_layer_count(num_layers)
        layer = LayerSpec((
            TensorSpec("key", (kv_heads, head_dim), 1, dtype_name(dtype)),
            TensorSpec("value", (kv_heads, v_head_dim or head_dim), 1, dtype_name(dtype)),
        ))
        return cls(model_id, (layer,) * num_layers, revision)

    @classmethod
    def mla(cls, model_id: str, num_layers: int, kv_lora_rank: int, rope_dim: int,
            dtype: torch.dtype | str = torch.bfloat16, revision: str = "") -> "KVSpec":
        """Multi-head latent attention: one latent ``[T, kv_lora_rank + rope_dim]`` per layer."""
        _check_layer_count(num_layers)
        if not (is_int(kv_lora_rank) and is_int(rope_dim)):
            raise ConfigError(f"kv_lora_rank and rope_dim must be ints, got {kv_lora_rank!r}, {rope_dim!r}")
        layer = LayerSpec((TensorSpec("latent", (kv_lora_rank + rope_dim,), 0, dtype_name(dtype)),))
        return cls(model_id, (layer,) * num_layers, revision)

    @classmethod
    def from_hf_config(cls, config: Any, dtype: torch.dtype | str = torch.bfloat16,
                       model_id: str | None = None, revision: str = "") -> "KVSpec":
        """Build the spec of a transformers ``PretrainedConfig`` (or any object with its fields).

        MLA models (``kv_lora_rank`` set) get one latent tensor per layer; every other model gets
        GQA key/value tensors from ``num_key_value_heads`` (default ``num_attention_heads``) and
        ``head_dim`` (default ``hidden_size // num_attention_heads``).
        """
        cfg = getattr(config, "get_text_config", lambda: config)()
        name = model_id or getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "")
        if not name:
            raise ConfigError("config has no _name_or_path or model_type; pass model_id=")
        try:
            layers = int(cfg.num_hidden_layers)
            if getattr(cfg, "kv_lora_rank", None):
                return cls.mla(name, layers, int(cfg.kv_lora_rank), int(cfg.qk_rope_head_dim), dtype, revision)
            heads = int(cfg.num_attention_heads)
            kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
            head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        except AttributeError as e:
            raise ConfigError(f"config lacks an attention field tierkv needs: {e}") from None
        v_dim = getattr(cfg, "v_head_dim", None)
        return cls.gqa(name, layers, kv_heads, head_dim, dtype, int(v_dim) if v_dim else None, revision)

    # -- sizes and offsets ---------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def bytes_per_token(self) -> int:
        """Raw (uncompressed) KV bytes per token over all layers."""
        return self._bytes_per_token

    def tensor_offset(self, layer: int, index: int, n_tokens: int) -> int:
        """Byte offset of tensor ``index`` of ``layer`` in the payload of an ``n_tokens`` block."""
        return self._offsets[layer][index] * n_tokens

    def layer_span(self, layer: int, n_tokens: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of ``layer`` in the payload of an ``n_tokens`` block."""
        start = self._offsets[layer][0] * n_tokens
        return start, start + self.layers[layer].bytes_per_token * n_tokens

    # -- identity ------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """A canonical, JSON-serialisable description; ``fingerprint`` hashes it."""
        return {
            "format": FORMAT_VERSION,
            "model_id": self.model_id,
            "revision": self.revision,
            "layers": [[[t.name, list(t.dims), t.seq_axis, t.dtype] for t in layer.tensors]
                       for layer in self.layers],
        }

    @classmethod
    def from_description(cls, doc: dict[str, Any]) -> "KVSpec":
        """Inverse of ``describe``: the spec a store records in its meta database."""
        try:
            layers = tuple(LayerSpec(tuple(TensorSpec(n, tuple(d), int(ax), dt) for n, d, ax, dt in layer))
                           for layer in doc["layers"])
            return cls(str(doc["model_id"]), layers, str(doc.get("revision", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"not a tierkv spec description: {e}") from None

    def fingerprint(self, **extra: Any) -> bytes:
        """16-byte blake2b digest of the description plus ``extra`` (block size, codec, ...)."""
        doc = dict(self.describe(), **extra)
        blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.blake2b(blob, digest_size=16).digest()

    # -- validation ----------------------------------------------------------------------------
    def check_kv(self, kv: Sequence[Sequence[torch.Tensor]], n_tokens: int) -> None:
        """Raise SpecMismatchError unless ``kv`` holds ``n_tokens`` tokens in this layout.

        ``kv`` is a sequence with one entry per layer, each a sequence of that layer's tensors.
        """
        if isinstance(kv, (torch.Tensor, str, bytes)) or not (hasattr(kv, "__len__") and hasattr(kv, "__getitem__")):
            raise SpecMismatchError(
                f"KV must be a list or tuple with one entry per layer, got {type(kv).__name__}")
        if len(kv) != self.num_layers:
            raise SpecMismatchError(f"KV has {len(kv)} layers; the spec of {self.model_id} has {self.num_layers}")
        device = None
        for i, (layer, tensors) in enumerate(zip(self.layers, kv)):
            if (isinstance(tensors, (torch.Tensor, str, bytes)) or not hasattr(tensors, "__len__")
                    or len(tensors) != len(layer.tensors)):
                raise SpecMismatchError(
                    f"layer {i}: expected a tuple of {len(layer.tensors)} tensors "
                    f"({', '.join(t.name for t in layer.tensors)})")
            for t, x in zip(layer.tensors, tensors):
                if not isinstance(x, torch.Tensor):
                    raise SpecMismatchError(f"layer {i} {t.name}: expected a torch.Tensor, got {type(x).__name__}")
                if x.layout != torch.strided:  # sparse, mkldnn: no byte view to copy from
                    raise SpecMismatchError(f"layer {i} {t.name}: a dense tensor is needed, got layout {x.layout}")
                want = t.shape(n_tokens)
                if tuple(x.shape) != want:
                    raise SpecMismatchError(
                        f"layer {i} {t.name}: shape {tuple(x.shape)} != expected {want} "
                        f"({n_tokens} tokens at axis {t.seq_axis}; no batch axis)")
                if x.dtype != t.torch_dtype:
                    raise SpecMismatchError(f"layer {i} {t.name}: dtype {x.dtype} != spec dtype {t.dtype}")
                if device is None:
                    device = x.device
                elif x.device != device:
                    raise SpecMismatchError(f"layer {i} {t.name}: on {x.device}, other tensors on {device}")
