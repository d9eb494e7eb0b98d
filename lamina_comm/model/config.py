"""Architecture hyper-parameters: ``LlamaConfig`` and the HF ``config.json`` it reads and writes.

Supported architectures: HF ``LlamaForCausalLM``, ``MistralForCausalLM`` and
``Qwen2ForCausalLM`` (Q/K/V biases).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from lamina_comm import dtypes

# The dtypes a model computes in (canonical names of lamina_comm.dtypes; aliases are not taken).
_MODEL_DTYPES = ("float32", "float16", "bfloat16")

_MODEL_TYPES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

# Keys each supported rope_scaling type needs, besides "rope_type".
_ROPE_SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class LlamaConfig:
    """The architecture hyper-parameters both tiers must agree on."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    dtype: str = "float32"
    architecture: str = "LlamaForCausalLM"
    rope_scaling: Optional[dict[str, Any]] = None  # normalised: {"rope_type": ..., <its keys>}
    sliding_window: Optional[int] = None  # Mistral only

    def __post_init__(self) -> None:
        self._validate_sizes()
        self._validate_architecture()
        _validate_rope_scaling(self.rope_scaling)

    def _validate_sizes(self) -> None:
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers",
            "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embedding, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.dtype not in _MODEL_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_MODEL_DTYPES)}, got {self.dtype!r}")

    def _validate_architecture(self) -> None:
        if self.architecture not in _MODEL_TYPES:
            raise ValueError(f"architecture must be one of {sorted(_MODEL_TYPES)}, got {self.architecture!r}")
        # Biases are fixed by the HF class, so a mismatch could not round-trip.
        if self.architecture == "Qwen2ForCausalLM" and not self.attention_bias:
            raise ValueError("Qwen2ForCausalLM always has q/k/v biases; attention_bias must be True")
        if self.architecture == "MistralForCausalLM" and self.attention_bias:
            raise ValueError("MistralForCausalLM has no attention biases; attention_bias must be False")
        if self.sliding_window is not None:
            if self.architecture != "MistralForCausalLM":
                raise ValueError("sliding_window is only supported for MistralForCausalLM")
            window = self.sliding_window
            if isinstance(window, bool) or not isinstance(window, int) or window < 1:
                raise ValueError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")

    # ------------------------------------------------------------ properties

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtypes.torch_dtype(self.dtype)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def fingerprint(self) -> str:
        """Short stable hash; two tiers with equal fingerprints run the same model."""
        canonical = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    # ----------------------------------------------------------- construction

    @classmethod
    def tiny(cls, **overrides: Any) -> "LlamaConfig":
        """A few-hundred-kB GQA model for tests (8 query heads on 2 KV heads)."""
        base = cls(
            vocab_size=256, hidden_size=128, intermediate_size=344, num_layers=4,
            num_heads=8, num_kv_heads=2, head_dim=16,
        )
        return dataclasses.replace(base, **overrides)

    @classmethod
    def from_dir(cls, path: Union[str, Path]) -> "LlamaConfig":
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        return cls.from_hf_dict(json.loads(config_path.read_text()))

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "LlamaConfig":
        """Read a HF ``config.json`` dict of a Llama, Mistral or Qwen2 model."""
        architecture = _architecture_of(d)
        _reject_unsupported_features(d, architecture)
        num_heads = _required(d, "num_attention_heads")
        rope_theta, rope_scaling = _rope_settings(d)
        return cls(
            vocab_size=_required(d, "vocab_size"),
            hidden_size=_required(d, "hidden_size"),
            intermediate_size=_required(d, "intermediate_size"),
            num_layers=_required(d, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or _required(d, "hidden_size") // num_heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=architecture == "Qwen2ForCausalLM" or bool(d.get("attention_bias", False)),
            dtype=_dtype_name(d),
            architecture=architecture,
            rope_scaling=rope_scaling,
            sliding_window=d.get("sliding_window") if architecture == "MistralForCausalLM" else None,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": _MODEL_TYPES[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.dtype,
        }
        if self.architecture == "LlamaForCausalLM":
            d.update(attention_bias=self.attention_bias, mlp_bias=False)
        elif self.architecture == "MistralForCausalLM":
            d["sliding_window"] = self.sliding_window
        else:
            d["use_sliding_window"] = False
        return d


def _required(d: Mapping[str, Any], key: str) -> Any:
    if d.get(key) is None:
        raise ValueError(f"config.json is missing required key {key!r}")
    return d[key]


def _architecture_of(d: Mapping[str, Any]) -> str:
    declared = d.get("architectures") or []
    for architecture in declared:
        if architecture in _MODEL_TYPES:
            return architecture
    for architecture, model_type in _MODEL_TYPES.items():
        if not declared and d.get("model_type") == model_type:
            return architecture
    raise ValueError(
        f"unsupported architecture {declared or d.get('model_type')!r}; supported: {sorted(_MODEL_TYPES)}"
    )


def _reject_unsupported_features(d: Mapping[str, Any], architecture: str) -> None:
    """Refuse configs we would silently compute wrong numbers for."""
    activation = d.get("hidden_act", "silu")
    if activation != "silu":
        raise NotImplementedError(f"hidden_act {activation!r} is not implemented (only 'silu')")
    if d.get("mlp_bias"):
        raise NotImplementedError("mlp_bias=True is not implemented")
    if architecture == "Qwen2ForCausalLM" and d.get("use_sliding_window"):
        raise NotImplementedError("Qwen2 use_sliding_window (per-layer windows) is not implemented")


def _dtype_name(d: Mapping[str, Any]) -> str:
    name = d.get("torch_dtype") or d.get("dtype") or "float32"
    if name not in _MODEL_DTYPES:
        raise ValueError(f"config.json dtype {name!r} is not supported; use one of {sorted(_MODEL_DTYPES)}")
    return name


def _rope_settings(d: Mapping[str, Any]) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, normalised rope_scaling) from either config layout:
    legacy ``rope_theta`` + ``rope_scaling`` or transformers-5 ``rope_parameters``."""
    parameters = d.get("rope_parameters")
    if parameters:
        theta = parameters.get("rope_theta", d.get("rope_theta", 10000.0))
        return float(theta), _normalise_rope_scaling(parameters)
    return float(d.get("rope_theta", 10000.0)), _normalise_rope_scaling(d.get("rope_scaling"))


def _normalise_rope_scaling(scaling: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return None
    if rope_type not in _ROPE_SCALING_KEYS:
        raise NotImplementedError(
            f"rope_scaling type {rope_type!r} is not implemented (supported: {sorted(_ROPE_SCALING_KEYS)})"
        )
    missing = [key for key in _ROPE_SCALING_KEYS[rope_type] if key not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} is missing {missing}")
    return {"rope_type": rope_type, **{key: scaling[key] for key in _ROPE_SCALING_KEYS[rope_type]}}


def _validate_rope_scaling(scaling: Optional[Mapping[str, Any]]) -> None:
    if scaling is None:
        return
    rope_type = scaling.get("rope_type")
    if rope_type not in _ROPE_SCALING_KEYS:
        raise NotImplementedError(
            f"rope_scaling type {rope_type!r} is not implemented (supported: {sorted(_ROPE_SCALING_KEYS)})"
        )
    for key in _ROPE_SCALING_KEYS[rope_type]:
        if not isinstance(scaling.get(key), (int, float)) or scaling[key] <= 0:
            raise ValueError(f"rope_scaling[{key!r}] must be a positive number, got {scaling.get(key)!r}")
