"""Paged KV cache: block accounting, attention correctness, head-split exactness."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from lamina_comm.errors import LaminaError  # noqa: E402
from lamina_comm.model import KVCacheFull, LlamaConfig, PagedKVCache, slice_heads, split_kv_heads  # noqa: E402

CONFIG = LlamaConfig.tiny(num_layers=2)  # 8 query heads on 2 KV heads, head_dim 16


def make_cache(config=CONFIG, heads=None, num_blocks=32, block_size=4, attention="exact") -> PagedKVCache:
    start, end = heads if heads is not None else (0, config.num_kv_heads)
    return PagedKVCache(config, start, end, num_blocks=num_blocks, block_size=block_size, attention=attention)


KERNELS = pytest.mark.parametrize("kernel", ["exact", "sdpa"])


def random_qkv(config, num_tokens, generator):
    q = torch.randn(num_tokens, config.num_heads, config.head_dim, generator=generator)
    k = torch.randn(num_tokens, config.num_kv_heads, config.head_dim, generator=generator)
    v = torch.randn(num_tokens, config.num_kv_heads, config.head_dim, generator=generator)
    return q, k, v


def ragged_steps(config, seed=0):
    """(request_ids, positions, q, k, v) per step: prefills, decodes, a late joiner."""
    generator = torch.Generator().manual_seed(seed)
    schedule = [
        [("a", 0, 6), ("b", 0, 3)],
        [("a", 6, 1), ("b", 3, 1), ("c", 0, 9)],
        [("a", 7, 1), ("b", 4, 1), ("c", 9, 1)],
        [("b", 5, 1), ("c", 10, 5), ("a", 8, 1)],
    ]
    for step in schedule:
        request_ids = [rid for rid, _, count in step for _ in range(count)]
        positions = torch.tensor([start + i for _, start, count in step for i in range(count)])
        yield (request_ids, positions, *random_qkv(config, len(request_ids), generator))


def naive_attention(history_q_pos, keys, values, q, group):
    """Causal attention of one token at history_q_pos over keys/values [P, kv, d]."""
    out = torch.empty_like(q)
    for head in range(q.shape[0]):
        k = keys[: history_q_pos + 1, head // group]
        v = values[: history_q_pos + 1, head // group]
        weights = torch.softmax(k @ q[head] / math.sqrt(q.shape[-1]), dim=0)
        out[head] = weights @ v
    return out


# ------------------------------------------------------------- head split


def test_split_kv_heads_is_equal_and_contiguous():
    assert split_kv_heads(8, 1) == [(0, 8)]
    assert split_kv_heads(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match="cannot split 8 KV heads evenly across 3 attention workers"):
        split_kv_heads(8, 3)
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        split_kv_heads(8, 0)


def test_slice_heads_picks_the_query_group_of_each_kv_head():
    q, k, v = random_qkv(CONFIG, 2, torch.Generator().manual_seed(0))
    q1, k1, v1 = slice_heads(q, k, v, (1, 2), CONFIG.group_size)
    assert torch.equal(q1, q[:, 4:8]) and torch.equal(k1, k[:, 1:2]) and torch.equal(v1, v[:, 1:2])


@pytest.mark.parametrize(
    "config, num_workers",
    [(CONFIG, 2), (LlamaConfig.tiny(num_layers=1, num_heads=8, num_kv_heads=4), 4),
     (LlamaConfig.tiny(num_layers=1, num_heads=8, num_kv_heads=4), 2)],
    ids=["2kv-2workers", "4kv-4workers", "4kv-2workers"],
)
def test_head_split_caches_equal_one_full_cache_exactly(config, num_workers):
    full = make_cache(config)
    workers = [make_cache(config, heads) for heads in split_kv_heads(config.num_kv_heads, num_workers)]
    for cache in (full, *workers):
        for request in "abc":
            cache.reserve(request, 16)
    for request_ids, positions, q, k, v in ragged_steps(config):
        for layer in range(config.num_layers):
            expected = full.attend(layer, request_ids, positions, q, k, v)
            pieces = [w.attend(layer, request_ids, positions, *slice_heads(q, k, v, w.kv_heads, config.group_size))
                      for w in workers]
            assert torch.equal(torch.cat(pieces, dim=1), expected)


# --------------------------------------------------------------- attention


@KERNELS
def test_attention_matches_naive_causal_attention_over_ragged_steps(kernel):
    cache = make_cache(attention=kernel)
    for request in "abc":
        cache.reserve(request, 16)
    keys = {r: torch.zeros(16, CONFIG.num_kv_heads, CONFIG.head_dim) for r in "abc"}
    values = {r: torch.zeros(16, CONFIG.num_kv_heads, CONFIG.head_dim) for r in "abc"}
    for request_ids, positions, q, k, v in ragged_steps(CONFIG, seed=3):
        out = cache.attend(0, request_ids, positions, q, k, v)
        for i, (request, position) in enumerate(zip(request_ids, positions.tolist())):
            keys[request][position], values[request][position] = k[i], v[i]
        for i, (request, position) in enumerate(zip(request_ids, positions.tolist())):
            expected = naive_attention(position, keys[request], values[request], q[i], CONFIG.group_size)
            torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-5)


@KERNELS
def test_sliding_window_hides_old_positions(kernel):
    config = LlamaConfig.tiny(num_layers=1, architecture="MistralForCausalLM", sliding_window=2)
    cache = make_cache(config, attention=kernel)
    cache.reserve("a", 8)
    generator = torch.Generator().manual_seed(0)
    q, k, v = random_qkv(config, 5, generator)
    out = cache.attend(0, ["a"] * 5, torch.arange(5), q, k, v)
    # Position 4 sees only positions 3 and 4: attending over keys[3:5] reproduces it.
    expected = naive_attention(1, k[3:5], v[3:5], q[4], config.group_size)
    torch.testing.assert_close(out[4], expected, rtol=0, atol=1e-5 if kernel == "sdpa" else 1e-6)


def test_layers_are_stored_independently():
    cache = make_cache()
    cache.reserve("a", 4)
    generator = torch.Generator().manual_seed(1)
    q, k0, v0 = random_qkv(CONFIG, 3, generator)
    _, k1, v1 = random_qkv(CONFIG, 3, generator)
    out0 = cache.attend(0, ["a"] * 3, torch.arange(3), q, k0, v0)
    cache.attend(1, ["a"] * 3, torch.arange(3), q, k1, v1)
    fresh = make_cache()
    fresh.reserve("a", 4)
    assert torch.equal(fresh.attend(0, ["a"] * 3, torch.arange(3), q, k0, v0), out0)


def test_freed_blocks_do_not_leak_into_the_next_request():
    generator = torch.Generator().manual_seed(2)
    cache = make_cache(num_blocks=2, block_size=4)
    cache.reserve("old", 8)
    cache.attend(0, ["old"] * 8, torch.arange(8), *random_qkv(CONFIG, 8, generator))
    cache.free("old")
    cache.reserve("new", 8)  # reuses both blocks
    q, k, v = random_qkv(CONFIG, 3, generator)
    reused = cache.attend(0, ["new"] * 3, torch.arange(3), q, k, v)
    fresh = make_cache(num_blocks=2, block_size=4)
    fresh.reserve("new", 8)
    assert torch.equal(reused, fresh.attend(0, ["new"] * 3, torch.arange(3), q, k, v))


@KERNELS
def test_nan_left_by_a_freed_request_does_not_poison_a_padded_decode_batch(kernel):
    """A short request batched with a long one reads padding slots; stale NaN there must not leak."""
    generator = torch.Generator().manual_seed(5)
    cache = make_cache(num_blocks=5, block_size=4, attention=kernel)
    cache.reserve("old", 8)
    q, k, v = random_qkv(CONFIG, 8, generator)
    nan = float("nan")
    cache.attend(0, ["old"] * 8, torch.arange(8), q, torch.full_like(k, nan), torch.full_like(v, nan))
    cache.free("old")
    cache.reserve("short", 4)  # gets block 0, whose slot 3 still holds NaN
    cache.reserve("long", 12)
    cache.attend(0, ["short"] * 2 + ["long"] * 10, torch.tensor([0, 1, *range(10)]), *random_qkv(CONFIG, 12, generator))
    out = cache.attend(0, ["short", "long"], torch.tensor([2, 10]), *random_qkv(CONFIG, 2, generator))
    assert torch.isfinite(out).all()


@KERNELS
def test_batched_decode_of_uneven_contexts_matches_separate_steps(kernel):
    """Decodes of short and long requests share one padded matmul; padding must not leak."""
    generator = torch.Generator().manual_seed(4)
    prefill = {"short": 2, "long": 13}
    together, alone = make_cache(attention=kernel), make_cache(attention=kernel)
    for cache in (together, alone):
        for request, length in prefill.items():
            cache.reserve(request, length + 1)
    for request, length in prefill.items():
        q, k, v = random_qkv(CONFIG, length, generator)
        for cache in (together, alone):
            cache.attend(0, [request] * length, torch.arange(length), q, k, v)
    q, k, v = random_qkv(CONFIG, 2, generator)
    batched = together.attend(0, ["short", "long"], torch.tensor([2, 13]), q, k, v)
    for i, (request, position) in enumerate([("short", 2), ("long", 13)]):
        single = alone.attend(0, [request], torch.tensor([position]), q[i : i + 1], k[i : i + 1], v[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, rtol=0, atol=1e-5 if kernel == "sdpa" else 1e-6)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sdpa_kernel_agrees_with_exact_within_the_dtypes_tolerance(dtype, atol):
    """The fused kernel runs in the cache's dtype: as close to the float32 reference as that dtype allows."""
    config = LlamaConfig.tiny(num_layers=1)
    exact = PagedKVCache(config, 0, config.num_kv_heads, num_blocks=32, block_size=4, dtype=dtype, attention="exact")
    fused = PagedKVCache(config, 0, config.num_kv_heads, num_blocks=32, block_size=4, dtype=dtype, attention="sdpa")
    assert (exact.attention, fused.attention) == ("exact", "sdpa")
    for cache in (exact, fused):
        for request in "abc":
            cache.reserve(request, 16)
    for request_ids, positions, q, k, v in ragged_steps(config, seed=7):
        a = exact.attend(0, request_ids, positions, q, k, v)
        b = fused.attend(0, request_ids, positions, q, k, v)
        torch.testing.assert_close(b.float(), a.float(), rtol=0, atol=atol)


def test_attention_kernel_choice():
    from lamina_comm.model.kvcache import resolve_attention_kernel
    assert resolve_attention_kernel("auto", "cpu") == "exact"
    assert resolve_attention_kernel("auto", "cuda:1") == "sdpa"
    assert resolve_attention_kernel("sdpa", "cpu") == "sdpa"
    with pytest.raises(ValueError, match="attention kernel must be one of auto, exact, sdpa"):
        resolve_attention_kernel("flash", "cpu")


# ------------------------------------------------------------------ blocks


def test_block_accounting():
    cache = make_cache(num_blocks=10, block_size=4)
    assert (cache.blocks_total, cache.blocks_used) == (10, 0)
    assert [cache.blocks_needed(n) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    cache.reserve("a", 9)
    assert cache.blocks_used == 3 and cache.has_request("a")
    assert cache.can_fit(28) and not cache.can_fit(29)
    cache.free("a")
    assert cache.blocks_used == 0 and not cache.has_request("a")


def test_reserve_raises_kv_cache_full_with_counts_and_changes_nothing():
    cache = make_cache(num_blocks=4, block_size=4)
    cache.reserve("a", 12)
    with pytest.raises(KVCacheFull, match=r"'b' needs 2 blocks \(5 tokens at block_size 4\) but only 1 of 4"):
        cache.reserve("b", 5)
    assert issubclass(KVCacheFull, LaminaError)
    assert cache.blocks_used == 3 and not cache.has_request("b")
    cache.reserve("c", 4)  # the one free block is still usable
    assert cache.blocks_used == 4


def test_reservation_errors():
    cache = make_cache()
    cache.reserve("a", 4)
    with pytest.raises(ValueError, match="already has a KV reservation"):
        cache.reserve("a", 4)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        cache.reserve("b", 0)
    with pytest.raises(KeyError, match="no KV reservation"):
        cache.free("b")


def test_constructor_validates_head_range():
    with pytest.raises(ValueError, match=r"\[1, 3\) is not a non-empty sub-range of \[0, 2\)"):
        make_cache(heads=(1, 3))
    with pytest.raises(ValueError, match="num_blocks and block_size"):
        PagedKVCache(CONFIG, 0, 2, num_blocks=0)


def test_pool_layout():
    cache = make_cache(heads=(1, 2), num_blocks=5, block_size=4)
    assert cache.k_pool.shape == (CONFIG.num_layers, 5, 4, 1, CONFIG.head_dim)
    assert (cache.n_local_kv_heads, cache.n_local_q_heads) == (1, 4)


# ----------------------------------------------------------- attend errors


def _attend(cache, request_ids, positions, config=CONFIG, layer=0):
    q, k, v = random_qkv(config, len(request_ids), torch.Generator().manual_seed(0))
    return cache.attend(layer, request_ids, torch.tensor(positions), q, k, v)


def test_attend_rejects_unknown_request():
    with pytest.raises(KeyError, match="call reserve"):
        _attend(make_cache(), ["ghost"], [0])


def test_attend_rejects_position_beyond_reservation():
    cache = make_cache()
    cache.reserve("a", 3)
    with pytest.raises(ValueError, match="position 3 exceeds its reservation of 3 tokens"):
        _attend(cache, ["a"] * 4, [0, 1, 2, 3])


def test_attend_rejects_gaps_and_unordered_positions():
    cache = make_cache()
    cache.reserve("a", 16)
    _attend(cache, ["a"] * 2, [0, 1])
    with pytest.raises(ValueError, match="starts at position 5 but only positions < 2 are cached"):
        _attend(cache, ["a"], [5])
    with pytest.raises(ValueError, match="consecutive"):
        _attend(cache, ["a"] * 2, [3, 2])
    with pytest.raises(ValueError, match="layer 1: step starts at position 2"):
        _attend(cache, ["a"], [2], layer=1)  # layer 1 has not seen positions 0-1


def test_attend_rejects_wrong_shapes_and_layers():
    cache = make_cache(heads=(0, 1))
    cache.reserve("a", 4)
    with pytest.raises(ValueError, match=r"q has shape \(1, 8, 16\), expected \(1, 4, 16\)"):
        _attend(cache, ["a"], [0])  # full-width q handed to a one-head worker
    with pytest.raises(ValueError, match="layer 2 out of range"):
        cache.attend(2, ["a"], torch.tensor([0]), *random_qkv(CONFIG, 1, torch.Generator()))
    with pytest.raises(ValueError, match="1 request ids but 2 positions"):
        full = make_cache()
        full.reserve("a", 4)
        full.attend(0, ["a"], torch.tensor([0, 1]), *random_qkv(CONFIG, 2, torch.Generator()))


def test_attend_into_a_given_buffer_is_bit_equal_and_checks_its_layout():
    """out= (a channel's reply slot) gets exactly what a fresh tensor would."""
    fresh, into = make_cache(), make_cache()
    for cache in (fresh, into):
        for request in "abc":
            cache.reserve(request, 16)
    for request_ids, positions, q, k, v in ragged_steps(CONFIG, seed=5):
        expected = fresh.attend(0, request_ids, positions, q, k, v)
        buffer = torch.full_like(q, float("nan"))
        got = into.attend(0, request_ids, positions, q, k, v, out=buffer)
        assert got is buffer and torch.equal(buffer, expected)
    with pytest.raises(ValueError, match="out is"):
        into.attend(1, *next(ragged_steps(CONFIG))[:2], *random_qkv(CONFIG, 9, torch.Generator()),
                    out=torch.empty(9, CONFIG.num_heads, CONFIG.head_dim, dtype=torch.float64))
