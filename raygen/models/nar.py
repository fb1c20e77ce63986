"""Family `nar`: Neighboring Autoregressive modeling (NAR, arXiv 2503.10696), next-neighbour prediction.

A LlamaGen GPT reads [class token, x_0, ..., x_{N-1}] in raster order (all N tokens are input)
under a *proximity-aware* mask: token (h, w) sits at Manhattan distance h + w from the first
token and attends to every token at distance <= h + w (plus the class token), so attention is
causal across anti-diagonals and bidirectional within one. Two dimension-oriented heads read
the result:

    horizontal head  norm -> output                              predicts the right neighbour (h, w+1)
    vertical head    one extra TransformerBlock -> norm -> output  predicts the one below (h+1, w)

The logits that score x_(h, w) are R of the left neighbour in row 0, B of the upper neighbour
in column 0, and the mean of both logit vectors inside the grid; the class position's R and B
are averaged to score x_(0, 0). Sampling therefore makes a whole anti-diagonal per forward
pass: 2g - 1 passes for a g x g grid (31 for 16 x 16) instead of g**2.

Module names follow the official NAR code (`layers.{n_layer}` is the vertical head block,
`medusa_norm`/`medusa_output` its norm and head), so the state dict has its keys and shapes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from einops import rearrange
from torch import nn

from raygen.models.ar import ARConfig
from raygen.models.base import FamilySpec, GenerativeModel, token_loss
from raygen.models.graphs import StepGraphs, decode_plan, step_runner
from raygen.models.layers import KVCache, LlamaGenMixin, RMSNorm, StaticCaches, StaticKVCache, TransformerBlock
from raygen.models.sampling import SamplingOptions, both_halves, head_logits, sampling_entry, with_null_class

# --- the proximity mask and the decoding schedule -------------------------------------------


def proximity_mask(grid: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(N + 1, N + 1) bool, True = attend, over [class token, raster tokens], N = grid**2.

    Token (h, w) attends to every token (h', w') with h' + w' <= h + w and to the class
    token; the class token attends only to itself (it gets distance -1).
    """
    rows = torch.arange(grid, device=device)
    dist = rearrange(rows[:, None] + rows[None, :], "h w -> (h w)")  # (N,)
    dist = torch.cat([torch.full((1,), -1, device=device, dtype=dist.dtype), dist])  # (N + 1,)
    return dist[None, :] <= dist[:, None]  # (query, key)


def diagonal(grid: int, k: int) -> list[int]:
    """Raster indices of anti-diagonal k (h + w = k), ordered by increasing row."""
    return [h * grid + (k - h) for h in range(max(0, k - grid + 1), min(k, grid - 1) + 1)]


def decode_schedule(grid: int) -> list[tuple[list[int], list[int]]]:
    """(fed, made) raster indices of each of the 2g - 1 forward passes.

    Pass 0 feeds only the class token and makes x_(0,0); pass k feeds diagonal k - 1 and
    makes diagonal k. While diagonal k grows (k < g) it has one token more than its input:
    the first comes from R of the first input, the last from B of the last input and token
    i + 1 from mean(B of input i, R of input i + 1). Once it shrinks (k >= g) every made
    token has both an upper and a left neighbour, so made token i = mean(B of input i, R of
    input i + 1) and the first and last rules no longer apply.
    """
    return [([], [0])] + [(diagonal(grid, k - 1), diagonal(grid, k)) for k in range(1, 2 * grid - 1)]


def neighbour_logits(logits_r: torch.Tensor, logits_b: torch.Tensor, grid: int) -> torch.Tensor:
    """Head logits (B, N + 1, V) over [class, raster tokens] -> logits scoring x (B, N, V).

    x_(0,0): mean(R, B) at the class position; row 0: R of the left neighbour; column 0: B
    of the upper neighbour; elsewhere the mean of those two logit vectors (not probabilities).
    R of the last column and B of the last row point outside the grid and are unused.
    """
    r = rearrange(logits_r[:, 1:], "b (h w) v -> b h w v", h=grid)  # (B, G, G, V)
    b = rearrange(logits_b[:, 1:], "b (h w) v -> b h w v", h=grid)
    out = torch.empty_like(r)  # (B, G, G, V), indexed by the target
    out[:, 0, 0] = (logits_r[:, 0] + logits_b[:, 0]) / 2
    out[:, 0, 1:] = r[:, 0, :-1]
    out[:, 1:, 0] = b[:, :-1, 0]
    out[:, 1:, 1:] = (r[:, 1:, :-1] + b[:, :-1, 1:]) / 2
    return rearrange(out, "b h w v -> b (h w) v")


def neighbour_sources(grid: int, device: torch.device | str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where `neighbour_logits` takes each target's logits from, as gather indices and weights.

    -> src_r, src_b (N,) int64: the input position (0 = class, 1 + p = raster token p) whose R
    resp. B head scores target t; w_r, w_b (N,) float32: their weights (0.5/0.5 at (0,0) and
    inside, 1/0 on row 0, 0/1 on column 0; a weight-0 source is the class position, never read
    for its value). So neighbour_logits(R, B) == w_r * R[:, src_r] + w_b * B[:, src_b] exactly.
    """
    t = torch.arange(grid * grid, device=device)
    i, j = t // grid, t % grid
    src_r = torch.where(j > 0, t, 0)  # 1 + (t - 1): the left neighbour's input position
    src_b = torch.where(i > 0, 1 + t - grid, 0)  # the upper neighbour's
    w_r = torch.where(i == 0, 1.0, 0.5) * (j > 0) + 0.5 * (t == 0)
    w_b = torch.where(j == 0, 1.0, 0.5) * (i > 0) + 0.5 * (t == 0)
    return src_r, src_b, w_r.float(), w_b.float()


def _diagonal_logits(logits_r: torch.Tensor, logits_b: torch.Tensor, *, growing: bool) -> torch.Tensor:
    """Head logits (B, L, V) of a fed diagonal -> logits of the next one (B, L +- 1, V)."""
    middle = (logits_b[:, :-1] + logits_r[:, 1:]) / 2  # (B, L - 1, V)
    if not growing:
        return middle
    return torch.cat([logits_r[:, :1], middle, logits_b[:, -1:]], dim=1)  # (B, L + 1, V)


# --- a KV cache that writes scattered positions ---------------------------------------------


class Slots(NamedTuple):
    """Cache slots of one decoding pass: where to write, and how many leading slots to read."""

    index: torch.Tensor  # (L,) int64 cache indices (raster index + 1), on the cache's device
    end: int  # read keys/values [0, end): every slot a query may attend to lies below it


class ScatterKVCache(KVCache):
    """A KVCache whose `update` also takes `Slots`: a diagonal is not a contiguous range.

    Zero-initialised: slots not yet written (holes below `end`) are masked out, but a
    garbage NaN there would still poison the weighted sum of values.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.k.zero_()
        self.v.zero_()

    def update(self, start_pos: int | Slots, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, L, K) at `start_pos` (an int: contiguous) or at `Slots`; return [0, end)."""
        if not isinstance(start_pos, Slots):
            return super().update(start_pos, k, v)
        self.k.index_copy_(2, start_pos.index, k)
        self.v.index_copy_(2, start_pos.index, v)
        return self.k[:, :, : start_pos.end], self.v[:, :, : start_pos.end]  # (B, H, S, K) views

    def keep_batch(self, n: int) -> None:
        """Keep the first n samples (drop the null-class half once guidance stops)."""
        self.k, self.v = self.k[:n], self.v[:n]


# --- config and sizes -------------------------------------------------------------------------


@dataclasses.dataclass
class NARConfig(ARConfig):
    """LlamaGen GPT hyperparameters; n_layer counts backbone blocks, the vertical head adds one."""


NAR_SIZES: dict[str, NARConfig] = {
    "debug": NARConfig(dim=128, n_layer=4, n_head=4),  # seconds on a CPU
    "B": NARConfig(dim=768, n_layer=12, n_head=12),  # 130.6M
    "M": NARConfig(dim=1024, n_layer=18, n_head=16),  # 295.5M (the paper rounds to 290M)
    "L": NARConfig(dim=1024, n_layer=24, n_head=16),  # 372.5M
    "XL": NARConfig(dim=1280, n_layer=36, n_head=20),  # 816.0M
    "XXL": NARConfig(dim=1536, n_layer=48, n_head=24),  # 1.46B
}


# --- the model -------------------------------------------------------------------------------


class NARModel(LlamaGenMixin, GenerativeModel):
    """LlamaGen GPT under the proximity mask, with horizontal (R) and vertical (B) heads."""

    zero_init = ("output", "medusa_output")  # both heads start at zero

    def __init__(self, config: NARConfig):
        super().__init__()
        self.config = c = config
        self.build_trunk(c.n_layer + 1)  # n_layer backbone blocks, then the vertical head's block
        # norm -> output is the horizontal head
        self.medusa_norm = RMSNorm(c.dim, eps=c.norm_eps)  # vertical head
        self.medusa_output = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.register_tables()  # freqs_cis, attn_mask: not in checkpoints, rebuilt after any move or cast
        self.last_forward_passes = 0  # forward passes of the last generate() call (benchmarks read it)
        self.initialize_weights()

    @property
    def head_block(self) -> TransformerBlock:
        """The vertical head's transformer block (stacked after the backbone)."""
        return self.layers[-1]

    def _tables(self, device: torch.device | None) -> dict[str, torch.Tensor]:
        """The RoPE table and the (N + 1, N + 1) proximity mask."""
        return {**super()._tables(device), "attn_mask": proximity_mask(self.config.grid_size, device=device)}

    def flops_per_sample(self) -> float:
        """As the base estimate, over N + 1 positions and n_layer + 1 blocks."""
        return self._flops(length=self.config.seq_len + 1, n_layer=self.config.n_layer + 1)

    # --- shared pieces of training and sampling ---------------------------------------------
    def _states(
        self,
        h: torch.Tensor,
        *,
        freqs: torch.Tensor,
        mask: torch.Tensor,
        caches: list[ScatterKVCache] | list[StaticKVCache] | None = None,
        slots: Slots | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, L, D) -> the normed states (B, L, D) the R and B heads read.

        freqs (L, K/2, 2) and mask (L, S) rows belong to the L positions; with caches, the
        keys/values go to `slots` and the mask's S columns are cache slots [0, slots.end)
        (static caches: slots (L,) int64 and all S_max slots).
        """
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            if i == self.config.n_layer:  # the backbone output feeds both heads
                states_r = self.norm(h)  # (B, L, D)
            h = layer(h, freqs, attn_mask=mask, kv_cache=cache, start_pos=0 if slots is None else slots)
        return states_r, self.medusa_norm(h)

    def _heads(self, h: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, L, D) -> float32 (R, B) logits (B, L, V) each (`_states`' arguments)."""
        states_r, states_b = self._states(h, **kw)
        return self.output(states_r).float(), self.medusa_output(states_b).float()

    def _new_caches(self, batch_size: int) -> list[ScatterKVCache]:
        c = self.config
        dtype, device = self.activation_dtype(), self.device
        return [
            ScatterKVCache(batch_size, c.n_head, c.seq_len + 1, c.head_dim, dtype=dtype, device=device)
            for _ in self.layers
        ]

    # --- training ---------------------------------------------------------------------------
    def forward(
        self, batch: dict[str, torch.Tensor], *, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Next-neighbour loss: one cross-entropy over all N tokens on the mixed R/B logits.

        The states each target needs are gathered before the heads (`neighbour_sources`), so the
        heads run on N rows and the backward scatters (B, N, D) states, not (B, N + 1, V) logits
        (the slice-assembled `neighbour_logits` cost ~8% of a step in zero-filled slice gradients).
        """
        tokens, labels = self.check_batch(batch)  # (B, N), (B,)
        h = self._embed(tokens, labels=labels, train=self.training, generator=generator)  # (B, N + 1, D)
        states_r, states_b = self._states(h, freqs=self.freqs_cis, mask=self.attn_mask)  # (B, N + 1, D) each
        src_r, src_b, w_r, w_b = neighbour_sources(self.config.grid_size, h.device)
        logits = (w_r[:, None] * self.output(states_r[:, src_r]).float()
                  + w_b[:, None] * self.medusa_output(states_b[:, src_b]).float())  # (B, N, V)
        return token_loss(logits, tokens)

    # --- sampling ---------------------------------------------------------------------------
    def _decode(
        self,
        labels: torch.Tensor,
        *,
        cfg_scale: float,
        cfg_interval: int,
        pick: Callable[[torch.Tensor, list[int]], torch.Tensor],
        graphs: str = "off",
    ) -> torch.Tensor:
        """The 2g - 1 cached passes; pick(logits (B, L, V), made raster ids) -> ids (B, L).

        graphs: the `graphs` sampling option (static passes, captured on CUDA); the logits pick
        sees are then a graph's output buffer, overwritten by a later pass.
        """
        c = self.config
        guided = cfg_scale != 1.0
        b = labels.shape[0]
        if guided:
            labels = with_null_class(labels, self.cls_embedding.null_id)  # (2B,)
        static, capture = decode_plan(graphs, self)
        if static:
            statics, graph_steps = self._static_state(labels.shape[0], capture=capture)
        else:
            caches = self._new_caches(labels.shape[0])
        out = torch.zeros(b, c.seq_len, dtype=torch.long, device=labels.device)  # (B, N) raster
        made_so_far, passes = 0, 0
        for k, (fed, made) in enumerate(decode_schedule(c.grid_size)):
            if guided and cfg_interval > -1 and made_so_far > cfg_interval:  # guidance off from here on
                guided = False
                if static:
                    statics = statics.keep_batch(b)
                else:
                    for cache in caches:
                        cache.keep_batch(b)
            if k == 0:
                h = self.cls_embedding(labels, train=False)  # (B2, 1, D)
                index = torch.zeros(1, dtype=torch.long, device=out.device)
            else:
                index = torch.tensor(fed, device=out.device)  # (L,) raster ids
                ids = out.index_select(1, index)  # (B, L)
                h = self.tok_embeddings(both_halves(ids, guided))  # (B2, L, D)
                index = index + 1  # cache slots
            scale = cfg_scale if guided else None  # both heads are linear: guided before the mix below
            growing = k < c.grid_size
            passes += 1
            if static:  # the key holds everything the pass depends on besides its tensors
                fn = functools.partial(self._static_pass, statics=statics, first=k == 0, growing=growing, scale=scale)
                logits = graph_steps(("nar", k == 0, growing, scale), fn, h, index)  # (B, L', V)
            else:
                slots = Slots(index, end=max(fed, default=-1) + 2)
                freqs = self.freqs_cis.index_select(0, index)  # (L, K/2, 2)
                mask = self.attn_mask.index_select(0, index)[:, : slots.end]  # (L, S)
                states_r, states_b = self._states(h, freqs=freqs, mask=mask, caches=caches, slots=slots)
                logits = self._pass_logits(states_r, states_b, first=k == 0, growing=growing, scale=scale)
            out[:, made] = pick(logits, made)  # (B, L')
            made_so_far += len(made)
        self.last_forward_passes = passes
        return out

    def _pass_logits(self, states_r: torch.Tensor, states_b: torch.Tensor, *, first: bool, growing: bool,
                     scale: float | None) -> torch.Tensor:
        """Normed states (B2, L, D) of a fed diagonal -> guided logits (B, L', V) of the next one."""
        logits_r = head_logits(self.output, states_r, scale)  # (B, L, V)
        logits_b = head_logits(self.medusa_output, states_b, scale)
        if first:
            return (logits_r + logits_b) / 2  # (B, 1, V)
        return _diagonal_logits(logits_r, logits_b, growing=growing)  # (B, L', V)

    # --- the static-shape decode pass (raygen.models.graphs) ------------------------------------
    def _static_state(self, batch_size: int, *, capture: bool) -> tuple[StaticCaches, StepGraphs]:
        """Fixed-shape caches over the N + 1 slots (reset) and the StepGraphs of the passes."""
        c = self.config
        dtype, device = self.activation_dtype(), self.device

        def build() -> StaticCaches:
            return StaticCaches(len(self.layers), batch_size, c.n_head, c.seq_len + 1, c.head_dim,
                                dtype=dtype, device=device)

        statics, graph_steps = step_runner(self, capture=capture, key=("nar", batch_size, dtype, device), build=build)
        statics.reset()
        return statics, graph_steps

    def _static_pass(self, h: torch.Tensor, slots: torch.Tensor, statics: StaticCaches, *, first: bool,
                     growing: bool, scale: float | None) -> torch.Tensor:
        """One decoding pass on static shapes: embeddings (B2, L, D) at cache slots (L,) -> logits (B, L', V).

        Every pass with the same L (and the same first/growing/scale) has the same shapes: the
        cache is read whole, under the proximity rows of the slots, which also hide every slot
        not yet written (a diagonal sees only earlier diagonals and itself).
        """
        freqs = self.freqs_cis.index_select(0, slots)  # (L, K/2, 2)
        mask = statics.visible(slots, self.attn_mask.index_select(0, slots))  # (L, N + 1)
        states_r, states_b = self._states(h, freqs=freqs, mask=mask, caches=statics.layers, slots=slots)
        return self._pass_logits(states_r, states_b, first=first, growing=growing, scale=scale)

    @sampling_entry
    def generate(self, labels: torch.Tensor, opts: SamplingOptions, *, cfg_interval: int = -1) -> torch.Tensor:
        """labels (B,) -> ids (B, G, G): 2G - 1 cached passes, one anti-diagonal each.

        cfg_scale == 1 runs the conditional batch alone; otherwise the batch is doubled with
        the null class and logits = uncond + cfg_scale * (cond - uncond). cfg_interval = -1
        guides every pass; cfg_interval = n stops guiding (and drops the null half) before
        the first pass that starts with more than n tokens already made.
        """
        c = self.config
        n_steps = 2 * c.grid_size - 1
        if opts.steps is not None and opts.steps != n_steps:
            raise ValueError(
                f"NAR decodes one anti-diagonal per step: steps must be {n_steps} (or None), got {opts.steps}"
            )
        self.check_generator(opts.generator)
        with self.evaluating():
            labels = self.check_labels(labels)  # (B,)
            out = self._decode(
                labels, cfg_scale=opts.cfg_scale, cfg_interval=cfg_interval, graphs=opts.graphs,
                pick=lambda logits, made: opts.sample(logits),
            )  # (B, N)
            return rearrange(out, "b (r c) -> b r c", r=c.grid_size)

    @torch.inference_mode()
    def logits_uncached(self, tokens: torch.Tensor, *, labels: torch.Tensor) -> torch.Tensor:
        """One masked pass over [class, tokens (B, N)] -> the logits scoring each x (B, N, V).

        Call in eval mode for deterministic values (no dropout).
        """
        h = self._embed(self.check_tokens(tokens), labels=labels.long(), train=False)  # (B, N + 1, D)
        logits_r, logits_b = self._heads(h, freqs=self.freqs_cis, mask=self.attn_mask)
        return neighbour_logits(logits_r, logits_b, self.config.grid_size)  # (B, N, V)

    @torch.inference_mode()
    def logits_cached(
        self, tokens: torch.Tensor, *, labels: torch.Tensor, cfg_scale: float = 1.0, cfg_interval: int = -1,
        graphs: str = "off",
    ) -> torch.Tensor:
        """The sampler's path teacher-forced on tokens (B, N): guided logits scoring each x (B, N, V).

        graphs: the passes' `graphs` mode ("off": the dynamic cache, else the static passes).
        """
        tokens = self.check_tokens(tokens)  # (B, N)
        out = torch.empty(*tokens.shape, self.config.vocab_size, device=tokens.device)  # (B, N, V)

        def pick(logits: torch.Tensor, made: list[int]) -> torch.Tensor:
            out[:, made] = logits
            return tokens[:, made]

        with self.evaluating():
            self._decode(labels.long(), cfg_scale=cfg_scale, cfg_interval=cfg_interval, pick=pick, graphs=graphs)
        return out


# --- official checkpoints ---------------------------------------------------------------------

# Entries of an official state dict that are not weights here: the RoPE table (a plain attribute
# officially, but older LlamaGen-style checkpoints hold it), the sampler's proximity mask (also
# under raygen's buffer name) and the KV-cache buffers that `setup_caches` registers (present in
# a state dict saved after sampling).
_OFFICIAL_NON_WEIGHTS = ("freqs_cis", "proximity_mask", "attn_mask")
_OFFICIAL_CACHE_SUFFIXES = (".attention.kv_cache.k_cache", ".attention.kv_cache.v_cache")


def from_official(state: dict[str, torch.Tensor], config: NARConfig) -> dict[str, torch.Tensor]:
    """An official NAR c2i GPT state dict -> NARModel's (same keys, shapes and [q | k | v] layout).

    `state` is the unwrapped weights (official checkpoints keep them under "model"; sample_c2i
    also reads "module" and "state_dict"). Tables and caches are dropped; any other key is kept,
    so a strict load names what raygen lacks (a t2i caption embedder, extra head blocks).
    `config` is the target architecture; the mapping is name-for-name and needs none of it.
    """
    del config  # the official names and layouts already agree with NARModel's
    return {
        k: v
        for k, v in state.items()
        if k not in _OFFICIAL_NON_WEIGHTS and not k.endswith(_OFFICIAL_CACHE_SUFFIXES)
    }


def official_arch(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """The NARConfig fields an official NAR state dict's shapes fix: dim, n_layer, vocab_size, num_classes.

    Official blocks number n_layer + medusa_attention_num, and no official script changes that
    from 1 (`layers.{n_layer}` is the vertical head's block); the class table has num_classes + 1
    rows, the last the null class (added by the default class_dropout_prob 0.1, which no official
    script changes either). n_head and grid_size leave no trace in the shapes (wqkv is (3 D, D);
    the RoPE table and the mask are not saved).
    """
    vocab_size, dim = state["tok_embeddings.weight"].shape  # (V, D)
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("layers.")}
    return {
        "dim": int(dim),
        "n_layer": max(blocks),  # blocks 0..n_layer, the last is the vertical head
        "vocab_size": int(vocab_size),
        "num_classes": int(state["cls_embedding.embedding_table.weight"].shape[0]) - 1,  # (C + 1, D)
    }


NAR_FAMILY = FamilySpec(family="nar", model_cls=NARModel, config_cls=NARConfig, sizes=NAR_SIZES,
                       from_official=from_official, official_arch=official_arch)
