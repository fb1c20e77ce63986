"""Family `arpg`: ARPG, randomized parallel autoregressive generation with guided decoding.

A two-pass "decoder-decoder" (YOCO-style) on the LlamaGen substrate:

- pass 1 (context): causal LlamaGen blocks over [class token, permuted tokens]; the final
  hidden states go through RMSNorm and ONE shared K and ONE shared V projection. RoPE is
  applied to K at each token's TRUE grid position (the class token keeps the zero slot).
- pass 2 (guided decoder): every query starts as the MASK-token embedding; RoPE at the
  TARGET position is the only thing that tells query i which token to predict. Each block
  is pre-norm cross-attention (a Q and an output projection only) plus a SwiGLU FFN, and
  every block attends to pass 1's shared K/V.

Training draws a random order per sample and scores all N tokens in one causal pass (query
i sees [cond, x_pi(0..i-1)]). Sampling decodes several tokens per forward pass: each step
feeds the previous step's tokens through pass 1 (KV cache, block-wise causal), appends
their shared K/V, and asks all of this step's MASK queries at once. The same weights edit
images zero-shot: known tokens are fed first and the rest is generated (`edit`).

One embedding table holds every input id (the official layout, which gives the paper's
exact parameter counts): image ids [0, V), MASK = V, class c -> V + 1 + c, the null class
V + C + 1, and one unused row (the official "none" token).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from raygen.models.ar import ARConfig
from raygen.models.base import FamilySpec, GenerativeModel, token_loss
from raygen.models.graphs import decode_plan, step_runner
from raygen.models.layers import (
    KVCache,
    LlamaGenMixin,
    PreNormBlock,
    RMSNorm,
    StaticCaches,
    TransformerBlock,
    apply_rotary_emb,
    drop_labels,
)
from raygen.models.sampling import SamplingOptions, both_halves, head_logits, sampling_entry, with_null_class

SCHEDULES = ("arccos", "cosine")  # step schedules: how many tokens each step reveals
CFG_SCHEDULES = ("linear", "constant")
ORDERS = ("random", "raster", "spiral-in", "spiral-out", "z-curve", "alternate")
DEFAULT_STEPS = 64  # the paper's headline setting (Table 2)

# --- config and sizes -------------------------------------------------------------------


@dataclasses.dataclass
class ARPGConfig(ARConfig):
    """ARPG hyperparameters (defaults: ARPG-L on the VQ-16 16x16 grid, ImageNet classes).

    The LlamaGen fields and their checks come from ARConfig; `n_layer` counts the blocks of
    both passes together and token_dropout applies to pass 1's input embeddings.
    """

    dim: int = 1024  # model width D
    n_layer: int = 24  # blocks of both passes together
    n_head: int = 16  # attention heads
    n_cross_layer: int | None = None  # pass-2 (guided decoder) blocks; None = n_layer // 2 (12+12)
    # RoPE slot of the class token. "zero" is ARPG's (and LlamaGen's) choice: zero cos/sin, so
    # the class token's key is the zero vector and every attention score is relative; no query
    # can learn its absolute grid position. "origin" rotates the class token like grid cell
    # (0, 0), so each query's score against it depends on the query's absolute position.
    # [I] a raygen option, not in the paper; it changes no parameter count. Small grids whose
    # content is anchored to the canvas (the 8x8 digits) learn far faster with it.
    class_rope: str = "zero"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.n_pass2 <= self.n_layer:
            raise ValueError(f"ARPGConfig: need 1 <= n_cross_layer <= n_layer ({self.n_layer}), got {self.n_pass2}")
        if self.class_rope not in ("zero", "origin"):
            raise ValueError(f"ARPGConfig: class_rope must be 'zero' or 'origin', got {self.class_rope!r}")

    @property
    def n_pass2(self) -> int:
        return self.n_layer // 2 if self.n_cross_layer is None else self.n_cross_layer

    @property
    def n_pass1(self) -> int:
        return self.n_layer - self.n_pass2


ARPG_SIZES: dict[str, ARPGConfig] = {
    "debug": ARPGConfig(dim=128, n_layer=4, n_head=4),  # 2+2 blocks, seconds on a CPU
    "L": ARPGConfig(dim=1024, n_layer=24, n_head=16),  # 12+12, 320M
    "XL": ARPGConfig(dim=1280, n_layer=36, n_head=20),  # 18+18, 719M
    "XXL": ARPGConfig(dim=1536, n_layer=48, n_head=24),  # 24+24, 1.3B
}


# --- generation orders and step schedules (pure functions) -------------------------------


def generation_order(
    name: str, grid: int, generator: torch.Generator | None = None, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """The raster indices of a grid x grid canvas in the order they are generated, (N,) int64.

    Our reading of the paper's Table 7 (the scan orders of RAR's study), documented because
    the paper only names them:
    - random: a uniformly random permutation from `generator` (the training distribution);
    - raster: row by row, left to right;
    - spiral-in: clockwise from the top-left corner along the border, ring by ring inwards;
    - spiral-out: spiral-in reversed, from the centre outwards to the top-left corner;
    - z-curve: Morton order (row/column bits interleaved, column as the low bit), so each
      2x2, 4x4, ... block finishes before the next; other grid sizes sort by the same code;
    - alternate: boustrophedon, even rows left to right and odd rows right to left.
    """
    n = grid * grid
    if generator is not None and device is None:
        device = generator.device
    if name == "random":
        return torch.rand(n, generator=generator, device=device).argsort()
    if name == "raster":
        idx = list(range(n))
    elif name in ("spiral-in", "spiral-out"):
        idx = _spiral_in(grid)[:: 1 if name == "spiral-in" else -1]
    elif name == "z-curve":
        idx = sorted(range(n), key=lambda i: _morton(i // grid, i % grid))
    elif name == "alternate":
        idx = [r * grid + (c if r % 2 == 0 else grid - 1 - c) for r in range(grid) for c in range(grid)]
    else:
        raise ValueError(f"unknown generation order '{name}'; known: {', '.join(ORDERS)}")
    return torch.tensor(idx, dtype=torch.long, device=device)


def _spiral_in(grid: int) -> list[int]:
    top, left, bottom, right = 0, 0, grid - 1, grid - 1
    out: list[int] = []
    while top <= bottom and left <= right:
        out += [top * grid + c for c in range(left, right + 1)]  # top row, rightwards
        out += [r * grid + right for r in range(top + 1, bottom + 1)]  # right column, down
        if top < bottom:
            out += [bottom * grid + c for c in range(right - 1, left - 1, -1)]  # bottom row, leftwards
        if left < right:
            out += [r * grid + left for r in range(bottom - 1, top, -1)]  # left column, up
        top, left, bottom, right = top + 1, left + 1, bottom - 1, right - 1
    return out


def _morton(row: int, col: int) -> int:
    code = 0
    for b in range(max(row, col).bit_length()):
        code |= ((col >> b) & 1) << (2 * b) | ((row >> b) & 1) << (2 * b + 1)
    return code


def _known_first(order: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """orders (Bo, N), known raster positions (Bp, K) -> (max(Bo, Bp), N): the known ones, then the rest in order."""
    n = order.shape[1]
    rows = max(order.shape[0], positions.shape[0])
    arange = torch.arange(n, device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, arange)  # (Bo, N): position -> rank
    positions = positions.expand(rows, -1)  # (R, K)
    unknown = torch.ones(rows, n, dtype=torch.long, device=order.device).scatter_(1, positions, 0)
    orders = (rank.expand(rows, -1) + n * unknown).argsort(dim=1)  # (R, N)
    orders[:, : positions.shape[1]] = positions  # in the prefix's own order (a chunk has no order)
    return orders


def step_sizes(n_tokens: int, steps: int, schedule: str = "arccos") -> list[int]:
    """Tokens decoded at each step: min(steps, n_tokens) positive sizes summing to n_tokens.

    The official rule: after step s (of S) a fraction r of the tokens is still masked, with
    r = arccos((s+1)/S) / (pi/2) ("arccos", the default) or cos(pi/2 (s+1)/S) ("cosine");
    mask_len = int(n r) clamped to [1, n - done - 1], and the last step takes the rest. We
    also keep mask_len >= the steps still to come, so every step decodes at least one token
    and steps == n gives exactly one per step (the official clamp alone can run out of
    tokens before the last step when S is close to n; at 64 steps over 256 it never binds).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown step schedule '{schedule}'; known: {', '.join(SCHEDULES)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    steps = min(steps, n_tokens)
    sizes, done = [], 0
    for s in range(steps):
        if s == steps - 1:
            sizes.append(n_tokens - done)
            break
        t = (s + 1) / steps
        ratio = math.acos(t) / (math.pi / 2) if schedule == "arccos" else math.cos(math.pi / 2 * t)
        mask_len = min(max(int(n_tokens * ratio), steps - s - 1), n_tokens - done - 1)
        sizes.append(n_tokens - done - mask_len)
        done = n_tokens - mask_len
    return sizes


# --- pass-2 layers -----------------------------------------------------------------------


class GuidedAttention(nn.Module):
    """Cross-attention with only a Q and an output projection: keys/values come from pass 1."""

    def __init__(self, dim: int, n_head: int, *, resid_dropout: float = 0.0):
        super().__init__()
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(
        self, x: torch.Tensor, freqs_cis: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, L, D) queries, RoPE'd at their TARGET positions; k, v (B, H, S, K) -> (B, L, D).

        causal (training, L == S): query i sees keys <= i; otherwise every key, or those where
        attn_mask (boolean, broadcastable to (B, H, L, S)) is True.
        """
        q = apply_rotary_emb(rearrange(self.wq(x), "b l (h k) -> b l h k", k=self.head_dim), freqs_cis)
        q = rearrange(q, "b l h k -> b h l k")  # (B, H, L, K)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)  # (B, H, L, K)
        return self.resid_dropout(self.wo(rearrange(out, "b h l k -> b l (h k)")))


class GuidedBlock(PreNormBlock):
    """Pre-norm guided-decoder block: x + xattn(norm(x), K, V), then h + ffn(norm(h)).

    Called as block(x (B, L, D), freqs_cis, k, v, *, causal, attn_mask), the arguments of `GuidedAttention`.
    """

    def __init__(self, dim: int, n_head: int, *, resid_dropout: float, ffn_dropout: float, norm_eps: float):
        attention = GuidedAttention(dim, n_head, resid_dropout=resid_dropout)
        super().__init__(attention, dim, ffn_dropout=ffn_dropout, norm_eps=norm_eps)


# --- the model -----------------------------------------------------------------------------


class ARPGModel(LlamaGenMixin, GenerativeModel):
    """ARPG: causal context pass -> one shared K/V -> MASK queries guided by target RoPE.

    `flops_per_sample` is the base estimate with n_layer = both passes: pass 1 runs N
    positions (cond + N-1 tokens) through n_pass1 blocks, pass 2 runs N queries through
    n_pass2 blocks against N keys, so 6 P N + 12 n_layer D N^2 holds as for raster AR.
    """

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.config = c = config
        self.mask_id = c.vocab_size  # the query token
        self.null_id = c.vocab_size + 1 + c.num_classes  # the null class, = class id of label C
        self.embeddings = nn.Embedding(c.vocab_size + 1 + c.num_classes + 1 + 1, c.dim)  # (last row unused)
        self.tok_dropout = nn.Dropout(c.token_dropout)
        block = dict(resid_dropout=c.resid_dropout, ffn_dropout=c.ffn_dropout, norm_eps=c.norm_eps)
        self.self_layers = nn.ModuleList(TransformerBlock(c.dim, c.n_head, **block) for _ in range(c.n_pass1))
        self.kv_norm = RMSNorm(c.dim, eps=c.norm_eps)
        self.to_k = nn.Linear(c.dim, c.dim, bias=False)  # shared by every pass-2 block
        self.to_v = nn.Linear(c.dim, c.dim, bias=False)
        self.cross_layers = nn.ModuleList(GuidedBlock(c.dim, c.n_head, **block) for _ in range(c.n_pass2))
        self.norm = RMSNorm(c.dim, eps=c.norm_eps)
        self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.register_tables()  # freqs_cis: not in checkpoints, rebuilt after any move or cast
        self.last_forward_passes = 0  # network evaluations per sample in the last generate/edit
        self.initialize_weights()

    def _rope_table(self, *, device: torch.device | None) -> torch.Tensor:
        table = super()._rope_table(device=device)  # (1 + N, K/2, 2)
        if self.config.class_rope == "origin":
            table[0] = table[1]  # the class slot takes cell (0, 0)'s rotation (angle 0)
        return table

    # --- the two passes ---------------------------------------------------------------------
    def _context(
        self,
        h: torch.Tensor,
        freqs: torch.Tensor,
        *,
        causal: bool = True,
        attn_mask: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        start_pos: int | torch.Tensor = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 1 over embeddings h (B, L, D) at positions freqs -> shared k, v (B, H, L, K).

        Static caches take start_pos as the slots (L,) int64 and need attn_mask (see StaticKVCache).
        """
        for i, layer in enumerate(self.self_layers):
            cache = None if caches is None else caches[i]
            h = layer(h, freqs, attn_mask=attn_mask, causal=causal, kv_cache=cache, start_pos=start_pos)
        h = self.kv_norm(h)  # (B, L, D)
        k = apply_rotary_emb(rearrange(self.to_k(h), "b l (h k) -> b l h k", k=self.config.head_dim), freqs)
        k = rearrange(k, "b l h k -> b h l k")  # RoPE at the tokens' true positions
        v = rearrange(self.to_v(h), "b l (h k) -> b h l k", k=self.config.head_dim)
        return k, v  # (B, H, L, K) each

    def _guided_states(self, k: torch.Tensor, v: torch.Tensor, freqs: torch.Tensor, *, causal: bool,
                       attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pass 2: MASK queries at target positions freqs ((B|1), L, K/2, 2) -> final normed states (B, L, D).

        attn_mask (boolean, broadcastable to (B, H, L, S)): the keys the queries see (None: all, or causal).
        """
        # a module call, not a weight lookup, so ZeRO-3 gathers the partitioned table first
        mask = self.embeddings(torch.full((1, 1), self.mask_id, device=k.device))  # (1, 1, D)
        x = mask.expand(k.shape[0], freqs.shape[-3], -1)  # (B, L, D): the same query everywhere
        for layer in self.cross_layers:
            x = layer(x, freqs, k, v, causal=causal, attn_mask=attn_mask)  # (B, L, D)
        return self.norm(x)

    def _guided(self, k: torch.Tensor, v: torch.Tensor, freqs: torch.Tensor, *, causal: bool) -> torch.Tensor:
        """Pass 2 -> float32 logits (B, L, V) (see `_guided_states`)."""
        return self.output(self._guided_states(k, v, freqs, causal=causal)).float()  # (B, L, V)

    def _teacher_forced(
        self, tokens: torch.Tensor, cond: torch.Tensor, order: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N), cond ids (B,), order (B, N) -> logits (B, N, V) and targets x_order (B, N)."""
        targets = tokens.gather(1, order)  # (B, N): x_pi
        pos = self.freqs_cis[1:][order]  # (B, N, K/2, 2): RoPE of pi(i), the targets' positions
        key_freqs = torch.cat([repeat(self.freqs_cis[0], "p two -> b 1 p two", b=len(order)), pos[:, :-1]], 1)
        ids = torch.cat([cond[:, None], targets[:, :-1]], dim=1)  # (B, N): [cond, x_pi(0..N-2)]
        k, v = self._context(self.tok_dropout(self.embeddings(ids)), key_freqs)  # (B, H, N, K)
        return self._guided(k, v, pos, causal=True), targets  # query i sees [cond, x_pi(<i)]

    def class_tables(self) -> dict[str, tuple[int, int]]:
        """The shared table: image ids and MASK, then the C class rows, then null and the unused row."""
        return {"embeddings.weight": (self.config.vocab_size + 1, self.config.num_classes)}

    def _cond_ids(self, labels: torch.Tensor) -> torch.Tensor:
        return labels.long() + self.config.vocab_size + 1  # label C (the null class) -> null_id

    # --- training ---------------------------------------------------------------------------
    def forward(
        self, batch: dict[str, torch.Tensor], *, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Random-order teacher forcing: one causal pass scores all N tokens -> {"loss", "acc"}."""
        tokens, labels = self.check_batch(batch)  # (B, N), (B,)
        b, n = tokens.shape
        if self.training and self.config.class_dropout > 0:
            labels = drop_labels(labels, self.config.class_dropout, self.config.num_classes, generator)  # (B,)
        order = torch.rand(b, n, device=tokens.device, generator=generator).argsort(dim=1)  # (B, N)
        return token_loss(*self._teacher_forced(tokens, self._cond_ids(labels), order))  # logits (B, N, V)

    @torch.inference_mode()
    def teacher_forced_logits(self, tokens: torch.Tensor, *, labels: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """The training pass with a given order (N,) or (B, N) -> logits (B, N, V), uncached.

        Row i predicts x_{order[i]} from [cond, x_order[0..i-1]]; labels may be C (null class).
        Call in eval mode for deterministic values (no dropout).
        """
        tokens = self.check_tokens(tokens)
        order = order.to(tokens.device).long().expand(tokens.shape[0], -1)
        return self._teacher_forced(tokens, self._cond_ids(labels.to(tokens.device)), order)[0]

    # --- sampling ---------------------------------------------------------------------------
    @sampling_entry
    def generate(
        self,
        labels: torch.Tensor,
        opts: SamplingOptions,
        *,
        order: str = "random",
        schedule: str = "arccos",
        cfg_schedule: str = "linear",
        prefix_tokens: torch.Tensor | None = None,
        prefix_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """labels (B,) -> ids (B, G, G) in raster layout, `steps` forward passes (default 64, <= N).

        order: one of ORDERS; "random" draws one permutation per sample from `generator` (as in
        training; a single order shared by the batch would make every sample of a batch start
        from the same cells), the named scan orders are shared by the batch.
        schedule: "arccos" | "cosine", tokens per step (`step_sizes`).
        cfg_schedule: "linear" (s = 1 + (g-1) done/N after the step's tokens) | "constant".
        prefix_tokens (B, K) with raster positions prefix_positions (K,) or (B, K): known
        tokens, fed with the class token in the first pass; only the rest is generated and
        the known tokens come back unchanged (see `edit`).
        Sets `last_forward_passes` (network evaluations per sample, = the number of steps).
        """
        generator = opts.generator
        self.check_generator(generator)
        checks = ((schedule, SCHEDULES, "step schedule"), (cfg_schedule, CFG_SCHEDULES, "cfg_schedule"))
        for value, known, what in checks:
            if value not in known:
                raise ValueError(f"unknown {what} '{value}'; known: {', '.join(known)}")
        if opts.steps is not None and opts.steps < 1:
            raise ValueError(f"steps must be >= 1 (or None for {DEFAULT_STEPS}), got {opts.steps}")
        with self.evaluating():
            labels = self.check_labels(labels)  # (B,)
            if order == "random":  # one permutation per sample
                n = self.config.seq_len
                orders = torch.rand(len(labels), n, generator=generator, device=labels.device).argsort(dim=1)  # (B, N)
            else:
                orders = generation_order(order, self.config.grid_size, generator, device=labels.device)[None]  # (1, N)
            prefix = None
            if prefix_tokens is not None:
                prefix, positions = self._check_prefix(prefix_tokens, prefix_positions, len(labels))  # (B, K), (Bo, K)
                orders = _known_first(orders, positions)  # (B or Bo, N)
            return self._decode(labels, orders, prefix, opts, cfg_schedule, schedule)

    def _check_prefix(
        self, tokens: torch.Tensor, positions: torch.Tensor | None, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.config.seq_len
        if positions is None:
            raise ValueError("prefix_tokens needs prefix_positions (their raster indices)")
        tokens = torch.as_tensor(tokens, device=self.device).long()
        positions = torch.as_tensor(positions, device=self.device).long()
        positions = positions[None] if positions.ndim == 1 else positions  # (Bo, K)
        if tokens.ndim != 2 or tokens.shape[0] != batch_size or tokens.shape[1] != positions.shape[1]:
            raise ValueError(f"prefix_tokens must be (B={batch_size}, K) with K = len(prefix_positions), "
                             f"got {tuple(tokens.shape)} and positions {tuple(positions.shape)}")
        if positions.shape[0] not in (1, batch_size):
            raise ValueError(f"prefix_positions must be (K,) or (B, K), got {tuple(positions.shape)}")
        if positions.numel() and (positions.min() < 0 or positions.max() >= n):
            raise ValueError(f"prefix_positions must lie in [0, {n})")
        srt = positions.sort(dim=1).values
        if (srt[:, 1:] == srt[:, :-1]).any():
            raise ValueError("prefix_positions repeat a position")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"prefix_tokens must lie in [0, {self.config.vocab_size})")
        return tokens, positions

    def _decode(
        self,
        labels: torch.Tensor,
        orders: torch.Tensor,
        prefix: torch.Tensor | None,
        opts: SamplingOptions,
        cfg_schedule: str,
        schedule: str,
    ) -> torch.Tensor:
        """The parallel decoding loop; orders (Bo, N) with Bo in {1, B}, prefix (B, K) at orders[:, :K]."""
        c = self.config
        n, b = c.seq_len, labels.shape[0]
        known = 0 if prefix is None else prefix.shape[1]
        sizes = step_sizes(n - known, DEFAULT_STEPS if opts.steps is None else opts.steps, schedule)
        self.last_forward_passes = len(sizes)
        seq = torch.empty(b, n, dtype=torch.long, device=labels.device)  # tokens in decoding order
        if prefix is not None:
            seq[:, :known] = prefix
        guided, cfg_scale = opts.guided, opts.cfg_scale
        cond = self._cond_ids(labels)  # (B,)
        if guided:
            cond = with_null_class(cond, self.null_id)  # (2B,)
        pos = self.freqs_cis[1:][orders]  # (Bo, N, K/2, 2)
        if pos.shape[0] > 1:
            pos = both_halves(pos, guided)  # the null half uses the same orders
        b2, bo = cond.shape[0], pos.shape[0]
        dtype, device = self.activation_dtype(), labels.device
        static, capture = decode_plan(opts.graphs, self)
        if static:
            self._static_decode(seq, cond, orders, prefix, sizes, opts, cfg_schedule, capture=capture)
            raster = torch.empty_like(seq).scatter_(1, orders.expand(b, n), seq)  # un-permute
            return rearrange(raster, "b (r c) -> b r c", r=c.grid_size)
        caches = [KVCache(b2, c.n_head, n, c.head_dim, dtype=dtype, device=device) for _ in self.self_layers]
        shared = KVCache(b2, c.n_head, n, c.head_dim, dtype=dtype, device=device)  # pass 2's keys/values

        # step 0 feeds the class token (+ the known tokens, which see it; it sees only itself)
        fed = cond[:, None]  # (B2, L)
        fed_freqs = repeat(self.freqs_cis[0], "p two -> b 1 p two", b=bo)  # (Bo, L, K/2, 2)
        attn_mask = None
        if known:
            fed = torch.cat([fed, both_halves(prefix, guided)], dim=1)
            fed_freqs = torch.cat([fed_freqs, pos[:, :known]], dim=1)
            attn_mask = torch.ones(known + 1, known + 1, dtype=torch.bool, device=device)
            attn_mask[0, 1:] = False
        start, done = 0, known
        for n_pred in sizes:
            h = self.embeddings(fed)  # (B2, L, D)
            k, v = self._context(h, fed_freqs, causal=False, attn_mask=attn_mask, caches=caches, start_pos=start)
            k, v = shared.update(start, k, v)  # (B2, H, S, K): everything fed so far
            start += fed.shape[1]
            q_freqs = pos[:, done : done + n_pred]  # (Bo, n_pred, K/2, 2): targets' positions
            states = self._guided_states(k, v, q_freqs, causal=False)  # (B2, n_pred, D)
            done += n_pred
            scale = None
            if guided:
                scale = 1.0 + (cfg_scale - 1.0) * done / n if cfg_schedule == "linear" else cfg_scale
            logits = head_logits(self.output, states, scale)  # (B, n_pred, V)
            tokens = opts.sample(logits)  # (B, n_pred)
            seq[:, done - n_pred : done] = tokens
            fed = both_halves(tokens, guided)  # (B2, n_pred): both halves see the same tokens
            fed_freqs, attn_mask = q_freqs, None
        raster = torch.empty_like(seq).scatter_(1, orders.expand(b, n), seq)  # un-permute
        return rearrange(raster, "b (r c) -> b r c", r=c.grid_size)

    # --- the static-shape decode step (raygen.models.graphs) ------------------------------------
    def _static_decode(
        self,
        seq: torch.Tensor,
        cond: torch.Tensor,
        orders: torch.Tensor,
        prefix: torch.Tensor | None,
        sizes: list[int],
        opts: SamplingOptions,
        cfg_schedule: str,
        *,
        capture: bool,
    ) -> None:
        """`_decode`'s loop on static shapes, filling seq (B, N) in decoding order (its first K = the prefix).

        Pass 1's caches and pass 2's shared keys/values are `StaticCaches` slots in feeding order,
        read whole under the mask of the slots written so far; positions, slots and the CFG scale
        are tensors, so every step with the same (fed, asked) sizes has the same shapes: with
        `capture`, one CUDA graph per distinct pair. The draws stay outside, in `opts.sample`.
        """
        c = self.config
        n = c.seq_len
        known = 0 if prefix is None else prefix.shape[1]
        guided, b2 = opts.guided, cond.shape[0]
        dtype, device = self.activation_dtype(), cond.device
        # RoPE rows of the targets: freqs_cis index 1 + raster position (the class token: row 0)
        pos = 1 + orders  # (Bo, N)
        if pos.shape[0] > 1:
            pos = both_halves(pos, guided)  # the null half uses the same orders
        bo = pos.shape[0]

        def build() -> StaticCaches:  # pass 1's layers, then pass 2's shared keys/values (always n slots)
            return StaticCaches(len(self.self_layers) + 1, b2, c.n_head, n, c.head_dim, dtype=dtype, device=device)

        statics, graph_steps = step_runner(self, capture=capture, key=("arpg", b2, dtype, device), build=build)
        statics.reset()
        scales = None
        if guided:
            g = opts.cfg_scale
            made = itertools.accumulate(sizes, initial=known)  # tokens made before each step, then after the last
            ramp = [1.0 + (g - 1.0) * done / n if cfg_schedule == "linear" else g for done in list(made)[1:]]
            scales = torch.tensor(ramp, dtype=torch.float32, device=device)  # (steps,): `_decode`'s scales

        # step 0 feeds the class token (+ the known tokens, which see it; it sees only itself)
        fed = cond[:, None]  # (B2, L)
        fed_pos = torch.zeros(bo, 1, dtype=torch.long, device=device)  # (Bo, L)
        allowed = None
        if known:
            fed = torch.cat([fed, both_halves(prefix, guided)], dim=1)
            fed_pos = torch.cat([fed_pos, pos[:, :known]], dim=1)
            allowed = statics.slot_ids[None, :] <= known  # (L, S): the class row sees only slot 0
            allowed = allowed.expand(known + 1, -1).clone()
            allowed[0, 1:] = False
        start, done = 0, known
        for s, n_pred in enumerate(sizes):
            q_pos = pos[:, done : done + n_pred]  # (Bo, n_pred): the targets' RoPE rows
            inputs = [fed, statics.slot_ids[start : start + fed.shape[1]], fed_pos, q_pos]
            if scales is not None:
                inputs.append(scales[s])
            if allowed is not None:
                inputs.append(allowed)
            fn = functools.partial(self._static_step, statics=statics, guided=scales is not None,
                                   structured=allowed is not None)
            logits = graph_steps(("arpg", scales is not None, allowed is not None), fn, *inputs)  # (B, n_pred, V)
            tokens = opts.sample(logits)  # (B, n_pred)
            seq[:, done : done + n_pred] = tokens
            start += fed.shape[1]
            done += n_pred
            fed = both_halves(tokens, guided)  # (B2, n_pred): both halves see the same tokens
            fed_pos, allowed = q_pos, None

    def _static_step(self, fed: torch.Tensor, slots: torch.Tensor, fed_pos: torch.Tensor, q_pos: torch.Tensor,
                     *extra: torch.Tensor, statics: StaticCaches, guided: bool, structured: bool) -> torch.Tensor:
        """One decoding step on static shapes -> guided logits (B, n_pred, V).

        fed ids (B2, L) at cache slots (L,) and RoPE rows fed_pos (Bo, L); queries at RoPE rows
        q_pos (Bo, n_pred); extra: the CFG scale (a 0-dim float32 tensor) when guided, then the
        (L, S) mask of the fed rows when structured (else every fed row sees every written slot).
        """
        scale = extra[0] if guided else None
        allowed = extra[-1] if structured else None
        h = self.embeddings(fed)  # (B2, L, D)
        mask = statics.visible(slots, allowed)  # (L | 1, S): written slots only
        *caches, shared = statics.layers
        k, v = self._context(h, self.freqs_cis[fed_pos], attn_mask=mask, caches=caches, start_pos=slots)
        k, v = shared.update(slots, k, v)  # (B2, H, S, K): every slot, the unwritten ones masked below
        states = self._guided_states(k, v, self.freqs_cis[q_pos], causal=False, attn_mask=statics.written[None])
        return head_logits(self.output, states, scale)  # (B, n_pred, V)

    @sampling_entry
    def edit(
        self,
        labels: torch.Tensor,
        tokens: torch.Tensor,
        keep: torch.Tensor,
        opts: SamplingOptions,
        *,
        order: str = "random",
        schedule: str = "arccos",
        cfg_schedule: str = "linear",
    ) -> torch.Tensor:
        """Zero-shot editing: keep tokens (B, G, G) where keep (G, G) or (B, G, G) is True, regenerate the rest.

        Inpainting keeps the outside of a hole, outpainting keeps a crop, class-conditional
        editing regenerates a region under another label. Returns (B, G, G) ids with every
        kept token unchanged. The CFG ramp counts kept tokens as done (the guidance tracks how
        much of the canvas is fixed). Per-sample masks with different kept counts are decoded
        in groups of equal count (one batch per group).
        """
        g = self.config.grid_size
        tokens = self.check_tokens(torch.as_tensor(tokens, device=self.device))  # (B, N)
        keep = torch.as_tensor(keep, device=tokens.device).bool()
        if keep.shape[-2:] != (g, g) or keep.ndim not in (2, 3):
            raise ValueError(f"keep must be ({g}, {g}) or (B, {g}, {g}) booleans, got {tuple(keep.shape)}")
        keep = rearrange(keep, "... r c -> ... (r c)").expand_as(tokens)  # (B, N)
        labels = self.check_labels(labels)
        knobs = dict(opts.kwargs(), order=order, schedule=schedule, cfg_schedule=cfg_schedule)
        out = torch.empty(tokens.shape[0], g, g, dtype=torch.long, device=tokens.device)
        counts = keep.sum(dim=1)  # (B,)
        for count in counts.unique().tolist():
            rows = (counts == count).nonzero()[:, 0]  # samples with this many kept tokens
            positions = keep[rows].nonzero()[:, 1].reshape(len(rows), count)  # (b, K) raster indices
            prefix = tokens[rows].gather(1, positions)  # (b, K)
            out[rows] = self.generate(labels[rows], prefix_tokens=prefix, prefix_positions=positions, **knobs)
        return out


# --- official checkpoints ---------------------------------------------------------------------

# Official block parameter suffixes -> ours, shared by both passes (pass 2's attention has no
# to_k/to_v: its keys come from the shared projections). Pass 1's to_q/to_k/to_v are fused.
_OFFICIAL_BLOCK = {
    "attn.to_q.weight": "attention.wq.weight",  # pass 2 only
    "attn.proj.weight": "attention.wo.weight",
    "ffn.w1.weight": "feed_forward.w1.weight",
    "ffn.w2.weight": "feed_forward.w2.weight",
    "ffn.w3.weight": "feed_forward.w3.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_OFFICIAL_TOP = {
    "embeddings.weight": "embeddings.weight",  # the same V + 1 + C + 1 + 1 row layout
    "layers.norm.weight": "kv_norm.weight",
    "layers.to_k.weight": "to_k.weight",
    "layers.to_v.weight": "to_v.weight",
    "norm.weight": "norm.weight",
    "head.weight": "output.weight",
}
_QKV = ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight")


def from_official(state: dict[str, torch.Tensor], config: ARPGConfig) -> dict[str, torch.Tensor]:
    """An official ARPG `Transformer` state dict -> ARPGModel's: renamed keys, pass 1's q/k/v fused into wqkv.

    `state` is the unwrapped weights (train_c2i.py saves {"model": ...}). self_dec.i ->
    self_layers.i (to_q/to_k/to_v stacked as wqkv rows [q | k | v]), cross_dec.i ->
    cross_layers.i, layers.norm/to_k/to_v -> kv_norm/to_k/to_v, head -> output. A RoPE table is
    dropped; any other key (and a q/k/v trio missing a member) keeps its official name, so a
    strict load names it. `config` is unused: block i maps to block i, every layout agrees.
    """
    del config
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}  # "self_layers.i" -> {official suffix: (D, D)}
    for key, value in state.items():
        if key.split(".")[-1] == "freqs_cis":
            continue  # derived cos/sin table, rebuilt by the model
        if key in _OFFICIAL_TOP:
            out[_OFFICIAL_TOP[key]] = value
            continue
        parts = key.split(".", 3)  # ["layers", "self_dec" | "cross_dec", i, suffix]
        if len(parts) == 4 and parts[0] == "layers" and parts[2].isdigit():
            ours = {"self_dec": "self_layers", "cross_dec": "cross_layers"}.get(parts[1])
            block, suffix = f"{ours}.{parts[2]}", parts[3]
            if ours == "self_layers" and suffix in _QKV:
                qkv.setdefault(block, {})[suffix] = value
                continue
            if ours is not None and suffix in _OFFICIAL_BLOCK:
                out[f"{block}.{_OFFICIAL_BLOCK[suffix]}"] = value
                continue
        out[key] = value  # unknown: a strict load reports it
    for block, trio in qkv.items():
        if len(trio) == 3:
            out[f"{block}.attention.wqkv.weight"] = torch.cat([trio[s] for s in _QKV])  # (3 D, D)
        else:  # incomplete: keep what is there, under the official names
            i = block.split(".")[1]
            out.update({f"layers.self_dec.{i}.{s}": v for s, v in trio.items()})
    return out


def official_arch(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """The ARPGConfig fields an official ARPG state dict's shapes fix: dim, n_layer, vocab_size, num_classes.

    n_layer counts both passes (the official n_layer // 2 self_dec + n_layer // 2 cross_dec
    blocks); n_cross_layer is added only if the two counts differ. The head has V rows and the
    embedding table V + 1 + C + 1 + 1 (image ids, MASK, C classes, the null class, the unused
    "none" token). n_head and the grid size leave no trace in the shapes (q/k/v are (D, D);
    the RoPE table is not saved): take them from the model name (ARPG-L/XL/XXL = L/XL/XXL
    here) and the image/downsample size.
    """
    vocab_size, dim = state["head.weight"].shape  # (V, D)
    rows, table_dim = state["embeddings.weight"].shape  # (V + 1 + C + 1 + 1, D)
    if table_dim != dim or rows < vocab_size + 4:
        raise ValueError(f"not an ARPG layout: head {tuple(state['head.weight'].shape)}, embeddings "
                         f"{(int(rows), int(table_dim))} (expected (V + C + 3, D) with C >= 1)")

    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)})

    n_self, n_cross = count("layers.self_dec."), count("layers.cross_dec.")
    arch = {"dim": int(dim), "n_layer": n_self + n_cross, "vocab_size": int(vocab_size),
            "num_classes": int(rows) - int(vocab_size) - 3}
    if n_self != n_cross:
        arch["n_cross_layer"] = n_cross
    return arch


ARPG_FAMILY = FamilySpec(family="arpg", model_cls=ARPGModel, config_cls=ARPGConfig, sizes=ARPG_SIZES,
                         from_official=from_official, official_arch=official_arch)
