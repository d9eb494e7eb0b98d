"""Config parsing, checkpoint I/O, and the model-tier math against a naive reference."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from lamina_comm.model import (  # noqa: E402
    CheckpointError,
    HeadOutputs,
    KVCacheFull,
    LlamaConfig,
    LlamaWeights,
    ModelTier,
    MonolithicModel,
    PagedKVCache,
    SamplingParams,
    StepInputs,
    rope_inv_freq,
    slice_heads,
    split_kv_heads,
)

# CUDA runs only where a GPU is present; the CPU run is the one CI always does.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]

# ---------------------------------------------------------------- helpers


def hf_llama_dict(**overrides) -> dict:
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 1000,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16",
    }
    d.update(overrides)
    return d


def perturbed_weights(config: LlamaConfig, seed: int, init_std: float = 0.1) -> LlamaWeights:
    """Random weights with non-unit norms, so a swapped or missing norm shows up.

    A larger init_std than the default makes attention sharp enough for a
    rotary or masking error to change the logits noticeably.
    """
    weights = LlamaWeights.random(config, seed=seed, init_std=init_std)
    generator = torch.Generator().manual_seed(seed + 1)

    def noisy_ones(like: torch.Tensor) -> torch.Tensor:
        return (1 + 0.2 * torch.randn(like.shape, generator=generator)).to(like.dtype)

    for layer in weights.layers:
        layer.input_norm = noisy_ones(layer.input_norm)
        layer.post_attention_norm = noisy_ones(layer.post_attention_norm)
    weights.norm = noisy_ones(weights.norm)
    return weights


def assert_same_weights(a: LlamaWeights, b: LlamaWeights) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# ---------------------------------------------------- naive reference model
# Written independently of lamina_comm.node: float64, whole sequence, no cache,
# rotary as an explicit pairwise rotation, GQA by repeating K/V heads.


def naive_logits(config: LlamaConfig, weights: LlamaWeights, tokens: list[int]) -> torch.Tensor:
    """Logits [T, vocab] for every position of one sequence."""
    w = {name: t.double() for name, t in weights.state_dict().items()}
    lm_head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    num_tokens = len(tokens)
    positions = torch.arange(num_tokens, dtype=torch.float64)
    x = w["model.embed_tokens.weight"][torch.tensor(tokens)]
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}."
        h = naive_rms(x, w[p + "input_layernorm.weight"], config.rms_norm_eps)
        q = naive_proj(h, w, p + "self_attn.q_proj", config.num_heads, config.head_dim)
        k = naive_proj(h, w, p + "self_attn.k_proj", config.num_kv_heads, config.head_dim)
        v = naive_proj(h, w, p + "self_attn.v_proj", config.num_kv_heads, config.head_dim)
        q, k = naive_rotate(q, positions, config.rope_theta), naive_rotate(k, positions, config.rope_theta)
        attn = naive_attention(q, k, v, config.sliding_window)
        x = x + attn.reshape(num_tokens, -1) @ w[p + "self_attn.o_proj.weight"].T
        h = naive_rms(x, w[p + "post_attention_layernorm.weight"], config.rms_norm_eps)
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return naive_rms(x, w["model.norm.weight"], config.rms_norm_eps) @ lm_head.T


def naive_rms(x, weight, eps):
    return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def naive_proj(h, w, prefix, heads, head_dim):
    out = h @ w[prefix + ".weight"].T
    if prefix + ".bias" in w:
        out = out + w[prefix + ".bias"]
    return out.view(h.shape[0], heads, head_dim)


def naive_rotate(x, positions, theta):
    """Rotate pairs (i, i + d/2) by angle position * theta^(-2i/d)."""
    half = x.shape[-1] // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angle = positions[:, None, None] * freq
    first, second = x[..., :half], x[..., half:]
    return torch.cat((first * angle.cos() - second * angle.sin(), second * angle.cos() + first * angle.sin()), -1)


def naive_attention(q, k, v, sliding_window):
    num_tokens, heads, head_dim = q.shape
    group = heads // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = torch.zeros_like(q)
    for i in range(num_tokens):
        first = 0 if sliding_window is None else max(0, i - sliding_window + 1)
        for head in range(heads):
            scores = k[first : i + 1, head] @ q[i, head] / math.sqrt(head_dim)
            out[i, head] = torch.softmax(scores, 0) @ v[first : i + 1, head]
    return out


# A ragged schedule: step -> {request: number of new tokens}.  b joins at
# step 1, c's prompt is prefilled in two chunks (steps 2 and 3), and every
# step mixes prefill with decode.
SCHEDULE = [
    {"a": 7, "b": 1},
    {"a": 1, "b": 1, "c": 5},
    {"a": 1, "b": 1, "c": 1, "d": 10},
    {"a": 1, "c": 1, "d": 8},
    {"a": 1, "b": 1, "c": 1, "d": 1},
]


def run_schedule(config: LlamaConfig, step_fn, seed: int = 0):
    """Feed SCHEDULE through step_fn; yields (histories, batch, logits) per step."""
    generator = torch.Generator().manual_seed(seed)
    histories: dict[str, list[int]] = {}
    for step in SCHEDULE:
        batch = []
        for request, count in step.items():
            new_tokens = torch.randint(0, config.vocab_size, (count,), generator=generator).tolist()
            history = histories.setdefault(request, [])
            batch.append((request, new_tokens, len(history)))
            history.extend(new_tokens)
        yield histories, batch, step_fn(batch)


PARITY_CONFIGS = {
    "llama-gqa": LlamaConfig.tiny(num_layers=2),
    "qwen2-bias-tied": LlamaConfig.tiny(
        num_layers=2, architecture="Qwen2ForCausalLM", attention_bias=True, tie_word_embeddings=True
    ),
    "mistral-window": LlamaConfig.tiny(num_layers=2, architecture="MistralForCausalLM", sliding_window=6),
    "mha-wide-head": LlamaConfig.tiny(num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32, rope_theta=500.0),
}


def reserve_schedule(model_or_caches, total_tokens: int = 32) -> None:
    for request in ("a", "b", "c", "d"):
        for target in model_or_caches:
            target.reserve(request, total_tokens)


# ------------------------------------------------------------------ config


def test_tiny_config_is_gqa_and_fingerprint_is_stable():
    config = LlamaConfig.tiny()
    assert (config.num_heads, config.num_kv_heads, config.group_size) == (8, 2, 4)
    assert config.fingerprint() == LlamaConfig.tiny().fingerprint()
    assert len(config.fingerprint()) == 16
    assert config.fingerprint() != LlamaConfig.tiny(dtype="bfloat16").fingerprint()
    assert config.fingerprint() != LlamaConfig.tiny(rope_theta=500000.0).fingerprint()


def test_from_hf_dict_applies_defaults():
    config = LlamaConfig.from_hf_dict(hf_llama_dict())
    assert config.num_kv_heads == 8  # defaults to num_attention_heads
    assert config.head_dim == 32  # hidden_size / heads
    assert config.dtype == "bfloat16"
    assert config.rms_norm_eps == 1e-5 and config.rope_theta == 500000.0
    assert not config.attention_bias and not config.tie_word_embeddings
    assert config.sliding_window is None


def test_from_hf_dict_reads_gqa_and_explicit_head_dim():
    config = LlamaConfig.from_hf_dict(hf_llama_dict(num_key_value_heads=2, head_dim=64))
    assert (config.num_kv_heads, config.head_dim) == (2, 64)


def test_qwen2_always_has_attention_bias():
    d = hf_llama_dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
                      sliding_window=4096, tie_word_embeddings=True)
    config = LlamaConfig.from_hf_dict(d)
    assert config.attention_bias and config.tie_word_embeddings
    assert config.sliding_window is None  # not used unless use_sliding_window


def test_mistral_reads_sliding_window():
    d = hf_llama_dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096)
    assert LlamaConfig.from_hf_dict(d).sliding_window == 4096


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig.tiny(),
        LlamaConfig.tiny(architecture="Qwen2ForCausalLM", attention_bias=True, tie_word_embeddings=True),
        LlamaConfig.tiny(architecture="MistralForCausalLM", sliding_window=32, dtype="float16"),
        LlamaConfig.tiny(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    ],
)
def test_hf_dict_round_trip(config):
    assert LlamaConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict()))) == config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_heads": 8, "num_kv_heads": 3}, "divisible by num_kv_heads"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"head_dim": 15}, "head_dim must be even"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
        ({"architecture": "GPT2LMHeadModel"}, "architecture must be one of"),
        ({"architecture": "Qwen2ForCausalLM"}, "attention_bias must be True"),
        ({"sliding_window": 16}, "only supported for MistralForCausalLM"),
    ],
)
def test_invalid_config_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.tiny(**overrides)


def test_unsupported_hf_configs_fail_at_load():
    with pytest.raises(ValueError, match="unsupported architecture"):
        LlamaConfig.from_hf_dict(hf_llama_dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    with pytest.raises(ValueError, match="missing required key 'hidden_size'"):
        LlamaConfig.from_hf_dict({k: v for k, v in hf_llama_dict().items() if k != "hidden_size"})
    with pytest.raises(NotImplementedError, match="yarn"):
        LlamaConfig.from_hf_dict(hf_llama_dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(NotImplementedError, match="dynamic"):
        LlamaConfig.from_hf_dict(hf_llama_dict(rope_scaling={"type": "dynamic", "factor": 2.0}))
    with pytest.raises(NotImplementedError, match="hidden_act"):
        LlamaConfig.from_hf_dict(hf_llama_dict(hidden_act="gelu"))
    with pytest.raises(NotImplementedError, match="use_sliding_window"):
        LlamaConfig.from_hf_dict(hf_llama_dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True))


def test_default_rope_scaling_and_rope_parameters_layout():
    assert LlamaConfig.from_hf_dict(hf_llama_dict(rope_scaling={"rope_type": "default"})).rope_scaling is None
    config = LlamaConfig.from_hf_dict(
        hf_llama_dict(rope_theta=None, rope_parameters={"rope_type": "linear", "rope_theta": 1234.0, "factor": 2.0})
    )
    assert config.rope_theta == 1234.0
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    base = rope_inv_freq(LlamaConfig.tiny())
    scaled = rope_inv_freq(LlamaConfig.tiny(rope_scaling=scaling))
    wavelength = 2 * math.pi / base
    high = wavelength < 64 / 4
    low = wavelength > 64 / 1
    assert high.any() and low.any() and (~high & ~low).any()  # all three regimes exercised
    assert torch.equal(scaled[high], base[high])
    torch.testing.assert_close(scaled[low], base[low] / 8)
    medium = ~high & ~low
    assert ((scaled[medium] < base[medium]) & (scaled[medium] > base[medium] / 8)).all()


def test_linear_rope_scaling_divides_frequencies():
    scaled = rope_inv_freq(LlamaConfig.tiny(rope_scaling={"rope_type": "linear", "factor": 4.0}))
    torch.testing.assert_close(scaled, rope_inv_freq(LlamaConfig.tiny()) / 4)


# -------------------------------------------------------------- checkpoints


def test_random_weights_are_deterministic_with_unit_norms():
    config = LlamaConfig.tiny()
    a, b = LlamaWeights.random(config, seed=3), LlamaWeights.random(config, seed=3)
    assert_same_weights(a, b)
    assert not torch.equal(a.embed_tokens, LlamaWeights.random(config, seed=4).embed_tokens)
    assert torch.equal(a.layers[0].input_norm, torch.ones(config.hidden_size))
    assert abs(a.layers[0].q_proj.std().item() - 0.02) < 0.002


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig.tiny(),
        LlamaConfig.tiny(tie_word_embeddings=True),
        LlamaConfig.tiny(architecture="Qwen2ForCausalLM", attention_bias=True),
    ],
    ids=["llama", "tied", "qwen2-bias"],
)
def test_save_load_round_trip(tmp_path: Path, config):
    weights = LlamaWeights.random(config, seed=1)
    weights.save(tmp_path)
    loaded = LlamaWeights.load(tmp_path)
    assert loaded.config == config
    assert_same_weights(weights, loaded)
    if config.tie_word_embeddings:
        assert loaded.lm_head is None and loaded.output_embedding is loaded.embed_tokens
    if config.attention_bias:
        assert loaded.layers[1].k_bias is not None
        assert torch.equal(loaded.layers[1].k_bias, weights.layers[1].k_bias)


def test_tied_checkpoint_has_no_lm_head(tmp_path: Path):
    from safetensors import safe_open

    LlamaWeights.random(LlamaConfig.tiny(tie_word_embeddings=True), seed=0).save(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()


@pytest.mark.parametrize("keep_index", [True, False], ids=["with-index", "without-index"])
def test_sharded_checkpoint_round_trip(tmp_path: Path, keep_index: bool):
    config = LlamaConfig.tiny(architecture="Qwen2ForCausalLM", attention_bias=True)
    weights = LlamaWeights.random(config, seed=2)
    weights.save(tmp_path, num_shards=3)
    assert len(list(tmp_path.glob("model-0000?-of-00003.safetensors"))) == 3
    if not keep_index:
        (tmp_path / "model.safetensors.index.json").unlink()
    assert_same_weights(weights, LlamaWeights.load(tmp_path))


def test_load_casts_to_config_dtype(tmp_path: Path):
    weights = LlamaWeights.random(LlamaConfig.tiny(), seed=0)
    weights.save(tmp_path)
    loaded = LlamaWeights.load(tmp_path, config=LlamaConfig.tiny(dtype="bfloat16"))
    assert loaded.embed_tokens.dtype == torch.bfloat16
    assert torch.equal(loaded.embed_tokens, weights.embed_tokens.to(torch.bfloat16))


def _rewrite_checkpoint(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path: Path):
    LlamaWeights.random(LlamaConfig.tiny(), seed=0).save(tmp_path)
    _rewrite_checkpoint(tmp_path, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.mlp\.up_proj\.weight'"):
        LlamaWeights.load(tmp_path)


def test_missing_lm_head_of_untied_model_is_named(tmp_path: Path):
    LlamaWeights.random(LlamaConfig.tiny(), seed=0).save(tmp_path)
    _rewrite_checkpoint(tmp_path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        LlamaWeights.load(tmp_path)


def test_misshaped_tensor_is_named(tmp_path: Path):
    LlamaWeights.random(LlamaConfig.tiny(), seed=0).save(tmp_path)

    def shrink(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 128)

    _rewrite_checkpoint(tmp_path, shrink)
    expected = r"'model\.layers\.0\.self_attn\.k_proj\.weight'.*\(16, 128\).*\(32, 128\)"
    with pytest.raises(CheckpointError, match=expected):
        LlamaWeights.load(tmp_path)


def test_bias_tensors_without_attention_bias_are_rejected(tmp_path: Path):
    LlamaWeights.random(LlamaConfig.tiny(architecture="Qwen2ForCausalLM", attention_bias=True), seed=0).save(tmp_path)
    with pytest.raises(CheckpointError, match="does not expect.*q_proj.bias"):
        LlamaWeights.load(tmp_path, config=LlamaConfig.tiny())


def test_missing_checkpoint_files(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaWeights.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LlamaConfig.tiny().to_hf_dict()))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        LlamaWeights.load(tmp_path)


# ------------------------------------------------------------- model tier


def test_model_tier_shapes():
    config = LlamaConfig.tiny()
    tier = ModelTier(config, LlamaWeights.random(config, seed=0))
    hidden = tier.embed(torch.tensor([1, 2, 3]))
    assert hidden.shape == (3, 128)
    q, k, v = tier.pre_attention(0, hidden, torch.tensor([0, 1, 2]))
    assert (q.shape, k.shape, v.shape) == ((3, 8, 16), (3, 2, 16), (3, 2, 16))
    assert tier.post_attention(0, hidden, torch.zeros(3, 8, 16)).shape == (3, 128)
    logits = tier.logits(hidden)
    assert logits.shape == (3, 256) and logits.dtype == torch.float32


def test_model_tier_rejects_weights_of_another_config():
    with pytest.raises(ValueError, match="weights were built for config"):
        ModelTier(LlamaConfig.tiny(), LlamaWeights.random(LlamaConfig.tiny(num_layers=2), seed=0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_pre_attention_into_writes_each_workers_heads_bit_for_bit(name, dtype, device):
    """The zero-copy path (projections written into send slots) == pre_attention + slice_heads."""
    config = dataclasses.replace(PARITY_CONFIGS[name], dtype=dtype)
    tier = ModelTier(config, perturbed_weights(config, seed=3), device=device)
    generator = torch.Generator().manual_seed(1)
    for num_tokens in (1, 5, 33):
        hidden = torch.randn(num_tokens, config.hidden_size, generator=generator).to(config.torch_dtype).to(device)
        positions = torch.randint(0, 4096, (num_tokens,), generator=generator)
        expected = tier.pre_attention(1, hidden, positions)
        for num_workers in sorted({1, min(2, config.num_kv_heads), config.num_kv_heads}):
            destinations = []
            for kv_heads in split_kv_heads(config.num_kv_heads, num_workers):
                local_kv = kv_heads[1] - kv_heads[0]
                # Poisoned buffers: every element must be written.
                q = torch.full((num_tokens, local_kv * config.group_size, config.head_dim), float("nan"),
                               dtype=config.torch_dtype, device=device)
                kv = [torch.full((num_tokens, local_kv, config.head_dim), float("nan"),
                                 dtype=config.torch_dtype, device=device) for _ in range(2)]
                destinations.append(HeadOutputs(kv_heads, q, *kv))
            tier.pre_attention_into(1, hidden, positions, destinations)
            for dest in destinations:
                want = slice_heads(*expected, dest.kv_heads, config.group_size)
                for got, exp, what in zip((dest.q, dest.k, dest.v), want, "qkv"):
                    assert torch.equal(got, exp), f"{what} of heads {dest.kv_heads} ({num_workers} workers, T={num_tokens})"


def test_post_attention_with_zero_attention_is_residual_plus_ffn():
    """With attn_out = 0 the layer reduces to the FFN residual block (HF residual semantics)."""
    config = LlamaConfig.tiny()
    weights = perturbed_weights(config, seed=0)
    tier = ModelTier(config, weights)
    hidden = torch.randn(4, config.hidden_size, generator=torch.Generator().manual_seed(0))
    layer = weights.layers[1]
    normed = naive_rms(hidden, layer.post_attention_norm, config.rms_norm_eps)
    gate, up = normed @ layer.gate_proj.T, normed @ layer.up_proj.T
    expected = hidden + (torch.nn.functional.silu(gate) * up) @ layer.down_proj.T
    torch.testing.assert_close(tier.post_attention(1, hidden, torch.zeros(4, 8, 16)), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_cached_monolithic_model_matches_naive_full_recompute(name, device):
    config = PARITY_CONFIGS[name]
    weights = perturbed_weights(config, seed=5)
    model = MonolithicModel(config, weights, device=device, num_blocks=64, block_size=4)
    reserve_schedule([model.cache])
    for histories, batch, logits in run_schedule(config, model.step):
        assert logits.shape == (len(batch), config.vocab_size)
        for row, (request, _, _) in enumerate(batch):
            expected = naive_logits(config, weights, histories[request])[-1].float()
            torch.testing.assert_close(logits[row].cpu(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_disaggregated_heads_reproduce_monolithic_logits_exactly(device):
    """Model tier + two attention workers (one KV head each) == MonolithicModel, bit for bit."""
    config = LlamaConfig.tiny(num_layers=2)
    weights = perturbed_weights(config, seed=7)
    monolithic = MonolithicModel(config, weights, device=device, num_blocks=64, block_size=4)
    tier = ModelTier(config, weights, device=device)
    workers = [PagedKVCache(config, start, end, num_blocks=64, block_size=4, device=device)
               for start, end in split_kv_heads(config.num_kv_heads, 2)]
    reserve_schedule([monolithic.cache, *workers])

    def remote_attend(layer, request_ids, positions, q, k, v):
        outputs = [worker.attend(layer, request_ids, positions, *slice_heads(q, k, v, worker.kv_heads,
                                                                          config.group_size))
                   for worker in workers]
        return torch.cat(outputs, dim=1)

    def disaggregated_step(batch):
        return tier.forward_step(StepInputs.from_batch(batch, config.vocab_size, device), remote_attend)

    reference_steps = [logits for _, _, logits in run_schedule(config, monolithic.step, seed=1)]
    split_steps = [logits for _, _, logits in run_schedule(config, disaggregated_step, seed=1)]
    for reference, split in zip(reference_steps, split_steps):
        assert torch.equal(reference, split)


def test_bfloat16_model_tracks_float32():
    config32 = LlamaConfig.tiny(num_layers=2)
    config16 = dataclasses.replace(config32, dtype="bfloat16")
    weights = LlamaWeights.random(config32, seed=0)
    weights16 = LlamaWeights.from_state_dict(config16, weights.state_dict())
    batch = [("a", list(range(10)), 0)]
    logits32 = _one_step(config32, weights, batch)
    logits16 = _one_step(config16, weights16, batch)
    assert logits16.dtype == torch.float32
    torch.testing.assert_close(logits16, logits32, rtol=0, atol=0.05)


def _one_step(config, weights, batch):
    model = MonolithicModel(config, weights, num_blocks=8, block_size=4)
    for request, tokens, start in batch:
        model.add_request(request, start + len(tokens))
    return model.step(batch)


# --------------------------------------------------------------- stepping


def test_step_inputs_flatten_ragged_batch():
    step = StepInputs.from_batch([("a", [5, 6, 7], 0), ("b", [9], 4)], vocab_size=16)
    assert step.request_ids == ["a", "a", "a", "b"]
    assert step.token_ids.tolist() == [5, 6, 7, 9]
    assert step.positions.tolist() == [0, 1, 2, 4]
    assert step.last_token_index.tolist() == [2, 3]


@pytest.mark.parametrize(
    "batch, message",
    [
        ([], "at least one"),
        ([("a", [1], 0), ("a", [2], 1)], "twice"),
        ([("a", [], 0)], "no tokens"),
        ([("a", [1], -1)], "start_position"),
        ([("a", [1, 16], 0)], r"outside \[0, 16\)"),
    ],
)
def test_step_inputs_reject_bad_batches(batch, message):
    with pytest.raises(ValueError, match=message):
        StepInputs.from_batch(batch, vocab_size=16)


def test_greedy_generate_matches_naive_argmax_loop():
    config = LlamaConfig.tiny(num_layers=2)
    weights = perturbed_weights(config, seed=9)
    model = MonolithicModel(config, weights, num_blocks=32, block_size=4)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    outputs = model.generate(prompts, SamplingParams(temperature=0, max_tokens=4))
    for prompt, output in zip(prompts, outputs):
        sequence = list(prompt)
        for _ in range(4):
            sequence.append(int(naive_logits(config, weights, sequence)[-1].argmax()))
        assert output == sequence[len(prompt):]
    assert model.cache.blocks_used == 0  # generate frees its reservations


def test_generate_stops_at_stop_token_and_is_reproducible_when_seeded():
    config = LlamaConfig.tiny(num_layers=2)
    model = MonolithicModel(config, perturbed_weights(config, seed=2), num_blocks=32, block_size=4)
    greedy = model.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=6))[0]
    stopped = model.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[greedy[1]]))[0]
    assert stopped == greedy[: greedy.index(greedy[1]) + 1]

    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=6, seed=123)
    first = model.generate([[1, 2, 3], [4, 5]], [sampled, sampled])
    again = model.generate([[1, 2, 3], [4, 5]], [sampled, sampled])
    assert first == again and all(len(tokens) == 6 for tokens in first)


def test_generate_refuses_before_starting_when_cache_is_too_small():
    config = LlamaConfig.tiny(num_layers=2)
    model = MonolithicModel(config, LlamaWeights.random(config, seed=0), num_blocks=3, block_size=4)
    with pytest.raises(KVCacheFull, match="needs 2 blocks.*only 1 of 3"):
        model.generate([[1] * 4, [2] * 4], SamplingParams(temperature=0, max_tokens=5))
    assert model.cache.blocks_used == 0
    assert not model.cache.k_pool.any()  # nothing was computed
