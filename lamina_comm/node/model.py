"""Model tier of a Llama-family decoder, split around attention.

Per layer the model tier computes ``pre_attention`` (RMSNorm, Q/K/V
projections, rotary embedding) and ``post_attention`` (output projection,
residual, RMSNorm, SwiGLU FFN, residual); the attention tier
(``kvcache.PagedKVCache.attend``) sits in between and holds no weights.

``MonolithicModel`` runs the same functions in the same order with one local
cache holding all KV heads.  It is the parity reference for the
disaggregated runtime: ``ModelTier.forward_step`` takes the attention as a
callable, so a remote attention tier plugs in without changing any shape.

Supported checkpoints: HF ``LlamaForCausalLM``, ``MistralForCausalLM`` and
``Qwen2ForCausalLM`` (Q/K/V biases) in safetensors format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from lamina_comm import dtypes
from lamina_comm.errors import LaminaError
from lamina_comm.node.kvcache import HeadRange, PagedKVCache, RequestId
from lamina_comm.node.sampling import SamplingParams, make_generator, sample

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


class CheckpointError(LaminaError, ValueError):
    """A checkpoint directory is unusable: missing, extra or mis-shaped tensors."""


# ====================================================================== config


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


# ===================================================================== weights

# LayerWeights field -> HF tensor name suffix after "model.layers.{i}.".
_LAYER_TENSOR_SUFFIXES: dict[str, str] = {
    "input_norm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o_proj": "self_attn.o_proj.weight",
    "post_attention_norm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
_BIAS_FIELDS = ("q_bias", "k_bias", "v_bias")
# Buffers some older checkpoints carry that hold no learned state.
_IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(eq=False)
class LayerWeights:
    input_norm: torch.Tensor
    q_proj: torch.Tensor
    k_proj: torch.Tensor
    v_proj: torch.Tensor
    o_proj: torch.Tensor
    post_attention_norm: torch.Tensor
    gate_proj: torch.Tensor
    up_proj: torch.Tensor
    down_proj: torch.Tensor
    q_bias: Optional[torch.Tensor] = None
    k_bias: Optional[torch.Tensor] = None
    v_bias: Optional[torch.Tensor] = None


def _layer_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each LayerWeights field present for this config."""
    hidden, inner = config.hidden_size, config.intermediate_size
    q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {
        "input_norm": (hidden,),
        "q_proj": (q_out, hidden),
        "k_proj": (kv_out, hidden),
        "v_proj": (kv_out, hidden),
        "o_proj": (hidden, q_out),
        "post_attention_norm": (hidden,),
        "gate_proj": (inner, hidden),
        "up_proj": (inner, hidden),
        "down_proj": (hidden, inner),
    }
    if config.attention_bias:
        shapes.update(q_bias=(q_out,), k_bias=(kv_out,), v_bias=(kv_out,))
    return shapes


def _layer_tensor_name(layer: int, field: str) -> str:
    return f"model.layers.{layer}.{_LAYER_TENSOR_SUFFIXES[field]}"


def expected_tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for every tensor the model needs."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size)}
    for layer in range(config.num_layers):
        for field, shape in _layer_shapes(config).items():
            shapes[_layer_tensor_name(layer, field)] = shape
    shapes["model.norm.weight"] = (config.hidden_size,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


def _check_tensor_shapes(config: LlamaConfig, found: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise CheckpointError naming missing, unexpected or mis-shaped tensors."""
    expected = expected_tensor_shapes(config)
    missing = [name for name in expected if name not in found]
    if missing:
        shown = ", ".join(repr(name) for name in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{source} is missing tensor {shown}{more}")
    unexpected = [
        name for name in found
        if name not in expected and name != "lm_head.weight" and not name.endswith(_IGNORED_TENSOR_SUFFIXES)
    ]
    if unexpected:
        raise CheckpointError(
            f"{source} has tensors the config does not expect: {unexpected[:5]} "
            f"(check num_hidden_layers / attention_bias in config.json)"
        )
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            raise CheckpointError(f"tensor {name!r} in {source} has shape {tuple(found[name])}, expected {shape}")


@dataclass(eq=False)
class LlamaWeights:
    """All weights of the model, held on one device in ``config.dtype``.

    ``lm_head`` is None when the embeddings are tied.
    """

    config: LlamaConfig
    embed_tokens: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: Optional[torch.Tensor]

    @property
    def output_embedding(self) -> torch.Tensor:
        return self.embed_tokens if self.lm_head is None else self.lm_head

    @classmethod
    def from_state_dict(
        cls, config: LlamaConfig, tensors: Mapping[str, torch.Tensor], source: str = "state dict"
    ) -> "LlamaWeights":
        """Build from HF-named tensors, cast to ``config.dtype``."""
        _check_tensor_shapes(config, {name: tuple(t.shape) for name, t in tensors.items()}, source)

        def get(name: str) -> torch.Tensor:
            return tensors[name].to(config.torch_dtype)

        layers = [
            LayerWeights(**{field: get(_layer_tensor_name(layer, field)) for field in _layer_shapes(config)})
            for layer in range(config.num_layers)
        ]
        return cls(
            config=config,
            embed_tokens=get("model.embed_tokens.weight"),
            layers=layers,
            norm=get("model.norm.weight"),
            lm_head=None if config.tie_word_embeddings else get("lm_head.weight"),
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """HF-named tensors (no ``lm_head.weight`` when tied)."""
        tensors = {"model.embed_tokens.weight": self.embed_tokens}
        for layer, weights in enumerate(self.layers):
            for field in _layer_shapes(self.config):
                tensors[_layer_tensor_name(layer, field)] = getattr(weights, field)
        tensors["model.norm.weight"] = self.norm
        if self.lm_head is not None:
            tensors["lm_head.weight"] = self.lm_head
        return tensors

    def to(self, device: Union[torch.device, str]) -> "LlamaWeights":
        moved = {name: tensor.to(device) for name, tensor in self.state_dict().items()}
        return LlamaWeights.from_state_dict(self.config, moved)

    @classmethod
    def random(cls, config: LlamaConfig, seed: int = 0, init_std: float = 0.02) -> "LlamaWeights":
        """Deterministic N(0, init_std) weights and biases, norms = 1."""
        generator = torch.Generator().manual_seed(seed)
        tensors = {}
        for name, shape in expected_tensor_shapes(config).items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape)
            else:
                tensors[name] = torch.randn(shape, generator=generator) * init_std
        return cls.from_state_dict(config, tensors)

    @classmethod
    def load(
        cls,
        path: Union[str, Path],
        device: Union[torch.device, str] = "cpu",
        config: Optional[LlamaConfig] = None,
    ) -> "LlamaWeights":
        """Load a HF safetensors checkpoint, single file or sharded.

        ``config`` defaults to the directory's config.json; pass one to
        override e.g. the dtype.
        """
        from safetensors import safe_open

        path = Path(path)
        config = config if config is not None else LlamaConfig.from_dir(path)
        locations = _tensor_locations(_checkpoint_files(path))
        shapes = {}
        for name, file in locations.items():
            with safe_open(str(file), framework="pt") as handle:
                shapes[name] = tuple(handle.get_slice(name).get_shape())
        _check_tensor_shapes(config, shapes, f"checkpoint {path}")
        # Shapes are checked first so that nothing is read for a bad checkpoint.
        tensors = {}
        for file, names in _group_by_file(locations, expected_tensor_shapes(config)).items():
            with safe_open(str(file), framework="pt") as handle:
                for name in names:
                    tensors[name] = handle.get_tensor(name).to(device=device, dtype=config.torch_dtype)
        return cls.from_state_dict(config, tensors, source=f"checkpoint {path}")

    def save(self, path: Union[str, Path], num_shards: int = 1) -> None:
        """Write config.json and HF-named safetensors (sharded with an index when num_shards > 1)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_hf_dict(), indent=2, sort_keys=True))
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        if num_shards == 1:
            save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
            return
        names = list(tensors)
        per_shard = -(-len(names) // num_shards)
        weight_map = {}
        for shard in range(num_shards):
            file_name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
            shard_names = names[shard * per_shard : (shard + 1) * per_shard]
            save_file({name: tensors[name] for name in shard_names}, str(path / file_name), metadata={"format": "pt"})
            weight_map.update({name: file_name for name in shard_names})
        total_size = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _checkpoint_files(path: Path) -> list[Path]:
    index_path = path / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index_path} lists shard files that do not exist: {absent}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    return files


def _tensor_locations(files: Sequence[Path]) -> dict[str, Path]:
    from safetensors import safe_open

    locations: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if name in locations:
                    raise CheckpointError(f"tensor {name!r} appears in both {locations[name]} and {file}")
                locations[name] = file
    return locations


def _group_by_file(locations: Mapping[str, Path], wanted: Mapping[str, Any]) -> dict[Path, list[str]]:
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(locations[name], []).append(name)
    return by_file


# ================================================================= model tier


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in float32, scale in the input dtype."""
    input_dtype = hidden.dtype
    hidden32 = hidden.float()
    variance = hidden32.pow(2).mean(-1, keepdim=True)
    return weight * (hidden32 * torch.rsqrt(variance + eps)).to(input_dtype)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim / 2] in float32, as HF computes them."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    return _llama3_inv_freq(inv_freq, scaling)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: slow down low frequencies, keep high ones, blend between."""
    factor = scaling["factor"]
    low_freq_factor, high_freq_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, head_dim] (HF rotate_half convention).

    ``out`` receives the result (the same final add, so the same bits).
    """
    return torch.add(x * cos[:, None, :], _rotate_half(x) * sin[:, None, :], out=out)


@dataclass(frozen=True)
class HeadOutputs:
    """Where ``ModelTier.pre_attention_into`` writes one attention worker's heads.

    q [T, local q heads, head_dim], k and v [T, local kv heads, head_dim]:
    typically views of that worker's send slot, so nothing is copied to send.
    """

    kv_heads: HeadRange
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


# attend(layer, request_ids, positions, q, k, v) -> attention output [T, num_heads, head_dim]
AttendFn = Callable[[int, Sequence[RequestId], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BatchEntry = tuple[RequestId, Sequence[int], int]  # (request_id, token_ids, start_position)


@dataclass(frozen=True)
class StepInputs:
    """One step's ragged batch flattened to per-token tensors.

    Both the monolithic and the disaggregated runtime build it with
    ``from_batch``, so the same batch gives the same token order and shapes.
    """

    request_ids: list[RequestId]  # [T], owner of each token
    token_ids: torch.Tensor  # [T] on the model device
    positions: torch.Tensor  # [T] on CPU: the attention tier plans with it
    last_token_index: torch.Tensor  # [N] index of each entry's last token, model device

    @classmethod
    def from_batch(
        cls, batch: Sequence[BatchEntry], vocab_size: int, device: Union[torch.device, str] = "cpu"
    ) -> "StepInputs":
        if not batch:
            raise ValueError("a step needs at least one batch entry")
        request_ids: list[RequestId] = []
        token_ids: list[int] = []
        positions: list[int] = []
        last_token_index: list[int] = []
        seen: set[Hashable] = set()
        for request_id, tokens, start in batch:
            _check_entry(request_id, tokens, start, vocab_size, seen)
            seen.add(request_id)
            request_ids.extend([request_id] * len(tokens))
            token_ids.extend(tokens)
            positions.extend(range(start, start + len(tokens)))
            last_token_index.append(len(token_ids) - 1)
        return cls(
            request_ids=request_ids,
            token_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long),
            last_token_index=torch.tensor(last_token_index, dtype=torch.long, device=device),
        )


def _check_entry(request_id: RequestId, tokens: Sequence[int], start: int, vocab_size: int, seen: set) -> None:
    if request_id in seen:
        raise ValueError(f"request {request_id!r} appears twice in one step")
    if len(tokens) == 0:
        raise ValueError(f"request {request_id!r} has no tokens in this step")
    if start < 0:
        raise ValueError(f"request {request_id!r} start_position must be >= 0, got {start}")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"request {request_id!r} has token ids outside [0, {vocab_size}): {bad[:5]}")


class ModelTier:
    """The weight-holding half of each layer; see the module docstring."""

    def __init__(self, config: LlamaConfig, weights: LlamaWeights, device: Union[torch.device, str] = "cpu") -> None:
        if weights.config != config:
            raise ValueError(
                f"weights were built for config {weights.config.fingerprint()}, not {config.fingerprint()}"
            )
        self.config = config
        self.device = torch.device(device)
        self.weights = weights.to(self.device)
        self._inv_freq = rope_inv_freq(config).to(self.device)
        # Logits are computed in float32 (spec); keep the cast copy instead of
        # re-casting the [vocab, hidden] matrix every step.
        self._lm_head_f32 = self.weights.output_embedding.float()

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [T] -> hidden [T, hidden_size]."""
        return F.embedding(token_ids.to(self.device), self.weights.embed_tokens)

    @torch.inference_mode()
    def pre_attention(
        self, layer: int, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input RMSNorm, Q/K/V projections and rotary embedding.

        Returns q [T, num_heads, head_dim], k and v [T, num_kv_heads, head_dim].
        """
        weights = self._layer(layer)
        num_tokens, head_dim = hidden.shape[0], self.config.head_dim
        normed = rms_norm(hidden, weights.input_norm, self.config.rms_norm_eps)
        q = F.linear(normed, weights.q_proj, weights.q_bias).view(num_tokens, self.config.num_heads, head_dim)
        k = F.linear(normed, weights.k_proj, weights.k_bias).view(num_tokens, self.config.num_kv_heads, head_dim)
        v = F.linear(normed, weights.v_proj, weights.v_bias).view(num_tokens, self.config.num_kv_heads, head_dim)
        cos, sin = self._rotary(positions, hidden.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    @torch.inference_mode()
    def pre_attention_into(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor,
                           destinations: Sequence[HeadOutputs]) -> None:
        """``pre_attention`` with each worker's heads written straight into its buffers.

        Bit for bit what ``pre_attention`` and ``slice_heads`` give: q and k are
        projected whole and the rotary's last (elementwise) op writes each head
        slice into place; v, which has no rotary, is projected per destination
        from its weight rows with ``out=`` (each output element is the same dot
        product; tests/node check the parity on every run).
        """
        weights = self._layer(layer)
        config = self.config
        num_tokens, head_dim, group = hidden.shape[0], config.head_dim, config.group_size
        normed = rms_norm(hidden, weights.input_norm, config.rms_norm_eps)
        q = F.linear(normed, weights.q_proj, weights.q_bias).view(num_tokens, config.num_heads, head_dim)
        k = F.linear(normed, weights.k_proj, weights.k_bias).view(num_tokens, config.num_kv_heads, head_dim)
        cos, sin = self._rotary(positions, hidden.dtype)
        for dest in destinations:
            start, end = dest.kv_heads
            apply_rotary(q[:, start * group:end * group], cos, sin, out=dest.q)
            apply_rotary(k[:, start:end], cos, sin, out=dest.k)
            rows = slice(start * head_dim, end * head_dim)
            v_out = dest.v.view(num_tokens, (end - start) * head_dim)
            if weights.v_bias is None:
                torch.mm(normed, weights.v_proj[rows].t(), out=v_out)
            else:
                torch.addmm(weights.v_bias[rows], normed, weights.v_proj[rows].t(), out=v_out)

    @torch.inference_mode()
    def post_attention(self, layer: int, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection + residual, post-attention RMSNorm, SwiGLU FFN + residual.

        ``hidden`` is the layer input (the residual stream), as in HF Llama.
        """
        weights = self._layer(layer)
        attn = F.linear(attn_out.reshape(hidden.shape[0], -1).to(hidden.dtype), weights.o_proj)
        residual = hidden + attn
        normed = rms_norm(residual, weights.post_attention_norm, self.config.rms_norm_eps)
        gated = F.silu(F.linear(normed, weights.gate_proj)) * F.linear(normed, weights.up_proj)
        return residual + F.linear(gated, weights.down_proj)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final RMSNorm + LM head, in float32: [T, hidden] -> [T, vocab]."""
        normed = rms_norm(hidden, self.weights.norm, self.config.rms_norm_eps)
        return F.linear(normed.float(), self._lm_head_f32)

    @torch.inference_mode()
    def forward_step(self, step: StepInputs, attend: AttendFn) -> torch.Tensor:
        """Run every layer of one step; returns float32 logits [N, vocab] of each entry's last token.

        ``attend`` receives all heads; a disaggregated runtime splits them
        across attention workers (``kvcache.slice_heads``) and concatenates.
        """
        hidden = self.embed(step.token_ids)
        for layer in range(self.config.num_layers):
            q, k, v = self.pre_attention(layer, hidden, step.positions)
            attn_out = attend(layer, step.request_ids, step.positions, q, k, v)
            hidden = self.post_attention(layer, hidden, attn_out)
        return self.logits(hidden.index_select(0, step.last_token_index))

    def _layer(self, layer: int) -> LayerWeights:
        if not 0 <= layer < self.config.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.config.num_layers})")
        return self.weights.layers[layer]

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(self.device).float()[:, None] * self._inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


# ============================================================ monolithic model


class MonolithicModel:
    """Model tier + one local cache holding all KV heads: the parity reference."""

    def __init__(
        self,
        config: LlamaConfig,
        weights: LlamaWeights,
        device: Union[torch.device, str] = "cpu",
        num_blocks: int = 256,
        block_size: int = 16,
    ) -> None:
        self.config = config
        self.tier = ModelTier(config, weights, device)
        self.device = self.tier.device
        self.cache = PagedKVCache(config, 0, config.num_kv_heads, num_blocks, block_size, self.device)
        self._generate_ids = itertools.count()

    def add_request(self, request_id: RequestId, max_tokens: int) -> None:
        """Reserve KV space for positions 0 .. max_tokens-1 (raises KVCacheFull)."""
        self.cache.reserve(request_id, max_tokens)

    def finish_request(self, request_id: RequestId) -> None:
        self.cache.free(request_id)

    def step(self, batch: Sequence[BatchEntry]) -> torch.Tensor:
        """One ragged step of (request_id, token_ids, start_position) entries.

        Returns float32 logits [len(batch), vocab] of each entry's last token.
        """
        step = StepInputs.from_batch(batch, self.config.vocab_size, self.device)
        return self.tier.forward_step(step, self.cache.attend)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
    ) -> list[list[int]]:
        """Generate for all prompts together (one prefill step, then batched decodes).

        ``params`` (one for all, or one per prompt; default greedy, 16 tokens)
        carries max_tokens, temperature, top_p, seed and stop tokens.  Returns
        the generated token ids per prompt, a stop token included.
        """
        per_prompt = _params_per_prompt(params, len(prompts))
        request_ids = [("generate", next(self._generate_ids)) for _ in prompts]
        self._reserve_all(request_ids, prompts, per_prompt)
        try:
            return self._generate_reserved(request_ids, prompts, per_prompt)
        finally:
            for request_id in request_ids:
                self.cache.free(request_id)

    def _reserve_all(
        self, request_ids: list[RequestId], prompts: Sequence[Sequence[int]], params: list[SamplingParams]
    ) -> None:
        """Admit every prompt or none, before any compute."""
        reserved: list[RequestId] = []
        try:
            for request_id, prompt, prompt_params in zip(request_ids, prompts, params):
                if not prompt:
                    raise ValueError("prompts must not be empty")
                # The last generated token is never fed back, hence the - 1.
                self.cache.reserve(request_id, len(prompt) + prompt_params.max_tokens - 1)
                reserved.append(request_id)
        except BaseException:
            for request_id in reserved:
                self.cache.free(request_id)
            raise

    def _generate_reserved(
        self, request_ids: list[RequestId], prompts: Sequence[Sequence[int]], params: list[SamplingParams]
    ) -> list[list[int]]:
        generators = [make_generator(p, self.device) for p in params]
        outputs: list[list[int]] = [[] for _ in prompts]
        index_of = {request_id: i for i, request_id in enumerate(request_ids)}
        batch: list[BatchEntry] = [(rid, list(prompt), 0) for rid, prompt in zip(request_ids, prompts)]
        while batch:
            rows = [index_of[entry[0]] for entry in batch]
            logits = self.step(batch)
            tokens = sample(logits, [params[i] for i in rows], [generators[i] for i in rows]).tolist()
            next_batch: list[BatchEntry] = []
            for i, token in zip(rows, tokens):
                outputs[i].append(token)
                finished = len(outputs[i]) >= params[i].max_tokens or token in params[i].stop_token_ids
                if not finished:
                    next_batch.append((request_ids[i], [token], len(prompts[i]) + len(outputs[i]) - 1))
            batch = next_batch
        return outputs


def _params_per_prompt(
    params: Union[SamplingParams, Sequence[SamplingParams], None], num_prompts: int
) -> list[SamplingParams]:
    if params is None:
        params = SamplingParams(temperature=0.0)
    if isinstance(params, SamplingParams):
        return [params] * num_prompts
    if len(params) != num_prompts:
        raise ValueError(f"got {len(params)} SamplingParams for {num_prompts} prompts")
    return list(params)
