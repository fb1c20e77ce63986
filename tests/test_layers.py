"""The shared LlamaGen substrate: RoPE, attention + KV cache, blocks, label dropout, sampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raygen.models.layers import (
    Attention,
    FeedForward,
    KVCache,
    LabelEmbedder,
    RMSNorm,
    TransformerBlock,
    apply_rotary_emb,
    ffn_hidden_dim,
    find_multiple,
    precompute_freqs_cis_2d,
)
from raygen.models.sampling import categorical, cfg_mix, filter_logits, guide, head_logits, sample_logits

# --- sizes and norms ----------------------------------------------------------------------


def test_ffn_hidden_dim_matches_llamagen():
    assert {d: ffn_hidden_dim(d) for d in (768, 1024, 1280, 1536)} == {
        768: 2048,
        1024: 2816,
        1280: 3584,
        1536: 4096,
    }
    assert find_multiple(256, 256) == 256 and find_multiple(257, 256) == 512
    ff = FeedForward(64, dropout=0.0)
    assert (ff.w1.weight.shape, ff.w3.weight.shape, ff.w2.weight.shape) == ((256, 64), (256, 64), (64, 256))


def test_rmsnorm_matches_formula_and_keeps_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), want)
    assert norm(x.bfloat16()).dtype == torch.float32  # bf16 normed * fp32 gain, as in LlamaGen


# --- 2D RoPE ------------------------------------------------------------------------------


def test_rope_table_shape_and_zero_class_rows():
    grid, hd = 4, 16
    table = precompute_freqs_cis_2d(grid, hd, cls_token_num=1)
    assert table.shape == (1 + grid * grid, hd // 2, 2) and table.dtype == torch.float32
    assert torch.count_nonzero(table[0]) == 0  # LlamaGen quirk: the class token's cos/sin are zero
    cos, sin = table[1:].unbind(-1)
    torch.testing.assert_close(cos**2 + sin**2, torch.ones_like(cos))
    two = precompute_freqs_cis_2d(grid, hd, cls_token_num=2)
    assert torch.count_nonzero(two[:2]) == 0 and torch.equal(two[2:], table[1:])


def test_rope_row_and_column_quarters():
    grid, hd, base = 5, 16, 10000.0
    table = precompute_freqs_cis_2d(grid, hd, base)[1:].reshape(grid, grid, hd // 2, 2)
    quarter = hd // 4
    rows, cols = table[..., :quarter, :], table[..., quarter:, :]
    # the first quarter of pairs depends only on the row, the second only on the column
    assert torch.equal(rows, rows[:, :1].expand_as(rows))
    assert torch.equal(cols, cols[:1].expand_as(cols))
    freqs = 1.0 / base ** (torch.arange(0, hd // 2, 2)[: hd // 4].float() / (hd // 2))
    angle = torch.atan2(rows[3, 0, :, 1], rows[3, 0, :, 0])
    torch.testing.assert_close(angle, 3 * freqs)
    angle = torch.atan2(cols[0, 2, :, 1], cols[0, 2, :, 0])
    torch.testing.assert_close(angle, 2 * freqs)


def test_rope_preserves_norms_and_zeroes_class_token():
    torch.manual_seed(0)
    table = precompute_freqs_cis_2d(4, 32)
    x = torch.randn(2, table.shape[0], 3, 32)
    y = apply_rotary_emb(x, table)
    assert y.shape == x.shape
    assert torch.count_nonzero(y[:, 0]) == 0
    torch.testing.assert_close(y[:, 1:].norm(dim=-1), x[:, 1:].norm(dim=-1))
    # pair-wise: each (x[2i], x[2i+1]) keeps its own length
    pairs_x = x[:, 1:].reshape(2, -1, 3, 16, 2).norm(dim=-1)
    pairs_y = y[:, 1:].reshape(2, -1, 3, 16, 2).norm(dim=-1)
    torch.testing.assert_close(pairs_y, pairs_x)
    assert apply_rotary_emb(x.bfloat16(), table).dtype == torch.bfloat16


def test_rope_relative_positions():
    # q.k after rotation depends on the (row, col) offset only, within the image grid
    torch.manual_seed(0)
    grid, hd = 6, 16
    table = precompute_freqs_cis_2d(grid, hd)
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(pq, pk):
        fq = table[1 + pq[0] * grid + pq[1]][None]
        fk = table[1 + pk[0] * grid + pk[1]][None]
        return (apply_rotary_emb(q, fq) * apply_rotary_emb(k, fk)).sum()

    torch.testing.assert_close(score((3, 4), (1, 2)), score((2, 3), (0, 1)))
    torch.testing.assert_close(score((5, 0), (4, 1)), score((2, 2), (1, 3)))


def test_rope_accepts_per_sample_positions():
    torch.manual_seed(0)
    table = precompute_freqs_cis_2d(3, 8)
    x = torch.randn(2, 4, 2, 8)
    order = torch.tensor([[0, 3, 5, 9], [0, 1, 7, 2]])
    y = apply_rotary_emb(x, table[order])  # (B, L, K/2, 2)
    for b in range(2):
        torch.testing.assert_close(y[b : b + 1], apply_rotary_emb(x[b : b + 1], table[order[b]]))


# --- attention and the KV cache ----------------------------------------------------------------


def _attention(dim=32, heads=4, seed=0):
    torch.manual_seed(seed)
    attn = Attention(dim, heads).eval()
    return attn, precompute_freqs_cis_2d(3, dim // heads)


def test_attention_explicit_causal_mask_equals_is_causal():
    attn, table = _attention()
    x = torch.randn(2, 10, 32)
    causal = attn(x, table)
    mask = torch.ones(10, 10, dtype=torch.bool).tril()
    torch.testing.assert_close(attn(x, table, attn_mask=mask), causal)
    full = attn(x, table, causal=False)
    torch.testing.assert_close(attn(x, table, attn_mask=torch.ones(10, 10, dtype=torch.bool)), full)
    assert not torch.allclose(full[:, :-1], causal[:, :-1])
    torch.testing.assert_close(full[:, -1], causal[:, -1])  # the last query sees everything either way


def test_kv_cache_decoding_matches_full_causal_pass():
    attn, table = _attention()
    x = torch.randn(2, 10, 32)
    full = attn(x, table)
    cache = KVCache(2, 4, 10, 8)
    steps = [attn(x[:, :3], table[:3], kv_cache=cache, start_pos=0)]  # a 3-token prefill
    steps += [attn(x[:, i : i + 1], table[i : i + 1], kv_cache=cache, start_pos=i) for i in range(3, 7)]
    steps.append(attn(x[:, 7:], table[7:], kv_cache=cache, start_pos=7))  # a chunk after a prefix
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_update_returns_prefix_views_and_checks_length():
    cache = KVCache(1, 2, 4, 3)
    k = torch.ones(1, 2, 2, 3)
    keys, values = cache.update(0, k, 2 * k)
    assert keys.shape == (1, 2, 2, 3) and keys.data_ptr() == cache.k.data_ptr()
    keys, values = cache.update(2, 3 * k[:, :, :1], 4 * k[:, :, :1])
    assert keys.shape == (1, 2, 3, 3) and torch.equal(values[:, :, 2], 4 * torch.ones(1, 2, 3))
    with pytest.raises(ValueError, match="holds 4 positions"):
        cache.update(3, k, k)


def test_block_parameter_names_follow_llamagen():
    block = TransformerBlock(64, 4)
    assert set(dict(block.named_parameters())) == {
        "attention.wqkv.weight",
        "attention.wo.weight",
        "feed_forward.w1.weight",
        "feed_forward.w2.weight",
        "feed_forward.w3.weight",
        "attention_norm.weight",
        "ffn_norm.weight",
    }
    assert block.attention.wqkv.weight.shape == (3 * 64, 64)


def test_block_with_zero_output_projections_is_identity():
    torch.manual_seed(0)
    block = TransformerBlock(32, 4).eval()
    with torch.no_grad():
        block.attention.wo.weight.zero_()
        block.feed_forward.w2.weight.zero_()
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(block(x, precompute_freqs_cis_2d(2, 8)[:5]), x)


# --- class labels -------------------------------------------------------------------------


def test_label_embedder_null_row_and_dropout():
    emb = LabelEmbedder(10, 8, dropout_prob=1.0)
    assert emb.embedding_table.weight.shape == (11, 8) and emb.null_id == 10
    labels = torch.arange(10)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(emb.token_drop(labels, g), torch.full((10,), 10))
    assert emb(labels, train=True, generator=g).shape == (10, 1, 8)
    torch.testing.assert_close(emb(labels, train=True, generator=g)[:, 0], emb.embedding_table.weight[[10] * 10])
    torch.testing.assert_close(emb(labels, train=False)[:, 0], emb.embedding_table.weight[:10])
    never = LabelEmbedder(10, 8, dropout_prob=0.0)
    assert torch.equal(never.token_drop(labels, g), labels)
    torch.testing.assert_close(never(labels, train=True, generator=g)[:, 0], never.embedding_table.weight[:10])


def test_label_dropout_rate_and_generator_reproducibility():
    emb = LabelEmbedder(1000, 4, dropout_prob=0.1)
    labels = torch.randint(0, 1000, (20000,))
    a = emb.token_drop(labels, torch.Generator().manual_seed(1))
    b = emb.token_drop(labels, torch.Generator().manual_seed(1))
    c = emb.token_drop(labels, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs((a == 1000).float().mean().item() - 0.1) < 0.01


# --- sampling helpers -----------------------------------------------------------------------


def test_sampling_greedy_paths_equal_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 3, 50)
    best = logits.argmax(-1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_logits(logits, temperature=0.0), best)
    assert torch.equal(sample_logits(logits, top_k=1, generator=g), best)
    assert torch.equal(sample_logits(logits, top_p=1e-6, generator=g), best)
    assert sample_logits(logits, generator=g).shape == (6, 3)


def test_filters_keep_what_they_should():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))  # 0.5 < 0.7, 0.8 >= 0.7: keep two
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.85))
    assert kept.tolist() == [[True, True, True, False]]
    assert torch.equal(filter_logits(logits), logits)
    shuffled = logits[:, [2, 0, 3, 1]]
    kept = torch.isfinite(filter_logits(shuffled, top_k=3, top_p=0.7))
    assert kept.tolist() == [[False, True, False, True]]


def test_sampling_distribution_with_fixed_generator():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = torch.log(probs).expand(40000, 4)
    g = torch.Generator().manual_seed(0)
    ids = sample_logits(logits, generator=g)
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    again = sample_logits(logits, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)
    # temperature 2 flattens: p ~ sqrt(probs)
    hot = sample_logits(logits[:, :3], temperature=2.0, generator=g)
    want = probs[:3].sqrt() / probs[:3].sqrt().sum()
    torch.testing.assert_close(torch.bincount(hot, minlength=3).float() / hot.numel(), want, atol=0.01, rtol=0)
    # top-k 2 renormalises over the two best
    top2 = sample_logits(logits, top_k=2, generator=g)
    torch.testing.assert_close(
        torch.bincount(top2, minlength=4).float() / top2.numel(), torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=0.01, rtol=0
    )


def test_sampling_rejects_bad_knobs():
    with pytest.raises(ValueError, match="temperature"):
        sample_logits(torch.zeros(2, 3), temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_logits(torch.zeros(2, 3), top_p=0.0)


def test_cfg_mix():
    cond, uncond = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(cfg_mix(cond, uncond, 1.0), cond)
    assert torch.equal(cfg_mix(cond, uncond, 0.0), uncond)
    assert torch.equal(cfg_mix(cond, uncond, 3.0), torch.tensor([4.0, -2.0]))
    assert math.isclose(F.softmax(cfg_mix(cond, uncond, 2.0), -1)[0].item(), 1 / (1 + math.exp(-4)), rel_tol=1e-6)


def test_guiding_the_states_before_a_linear_head_equals_guiding_its_logits():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False)
    states = torch.randn(6, 3, 16, generator=g)  # (2B, L, D): conditional half first
    with torch.no_grad():
        want = guide(head(states), 4.0)  # (B, L, V): two head rows per output, mixed after
        torch.testing.assert_close(head_logits(head, states, 4.0), want, atol=1e-5, rtol=1e-5)
        assert torch.equal(head_logits(head, states, None), head(states))
        low = states.bfloat16()  # lower precision: the mix stays on float32 logits
        out = head_logits(head.bfloat16(), low, 4.0)
        assert out.dtype == torch.float32 and torch.equal(out, guide(head(low).float(), 4.0))


def test_categorical_never_draws_zero_probability_ids():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([categorical(probs, generator=g) for _ in range(2000)])  # (2000, 3)
    assert set(ids[:, 0].tolist()) == {1, 3}
    assert set(ids[:, 1].tolist()) == {4} and set(ids[:, 2].tolist()) == {0}
    assert abs((ids[:, 0] == 1).float().mean().item() - 0.5) < 0.05
