"""Model weights: ``LlamaWeights`` under their HF tensor names, and safetensors checkpoints.

Checkpoints are HF safetensors, a single file or sharded with an index; every
tensor's name and shape is checked against the config before anything is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from lamina_comm import progress_bar
from lamina_comm.errors import LaminaError
from lamina_comm.model.config import LlamaConfig


class CheckpointError(LaminaError, ValueError):
    """A checkpoint directory is unusable: missing, extra or mis-shaped tensors."""


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
        with progress_bar.bar(len(locations), desc=f"loading {path.name}", unit="tensor") as shown:
            for file, names in _group_by_file(locations, expected_tensor_shapes(config)).items():
                with safe_open(str(file), framework="pt") as handle:
                    for name in names:
                        tensors[name] = handle.get_tensor(name).to(device=device, dtype=config.torch_dtype)
                        shown.update(1)
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
