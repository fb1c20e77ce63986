"""Family `ar`: LlamaGen's class-conditional raster-order GPT (the baseline the 2025 methods beat).

The sequence is [class token, x_0, ..., x_{N-2}] and position i predicts x_i, so one causal
pass over N positions scores all N tokens. Module names follow LlamaGen's `Transformer`
(`cls_embedding`, `tok_embeddings`, `layers`, `norm`, `output`), so the state dict has the
official keys and shapes and the named sizes have LlamaGen's exact parameter counts.

Sampling prefills the class token into a preallocated KV cache and then decodes one token
per forward pass (N passes in all); CFG runs the conditional and null-class halves as one
doubled batch and feeds the sampled token to both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from einops import rearrange

from raygen.models.base import FamilySpec, GenerativeModel, ModelConfig, token_loss
from raygen.models.graphs import decode_plan, step_runner
from raygen.models.layers import KVCache, LlamaGenMixin, StaticCaches
from raygen.models.sampling import SamplingOptions, both_halves, head_logits, sampling_entry, with_null_class

# --- config and sizes -------------------------------------------------------------------


@dataclasses.dataclass
class ARConfig(ModelConfig):
    """LlamaGen GPT hyperparameters (defaults: GPT-B on the VQ-16 16x16 grid, ImageNet classes)."""

    dim: int = 768  # model width D
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads; head_dim = dim / n_head must be a multiple of 4 (2D RoPE)
    resid_dropout: float = 0.1  # dropout on each attention output (LlamaGen resid_dropout_p)
    ffn_dropout: float = 0.1  # dropout on each SwiGLU output (ffn_dropout_p)
    token_dropout: float = 0.1  # dropout on the input embeddings (token_dropout_p)
    class_dropout: float = 0.1  # P(label -> null class) in training; enables CFG
    rope_base: float = 10000.0  # RoPE frequency base
    norm_eps: float = 1e-5  # RMSNorm epsilon

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = {f: getattr(self, f) for f in ("dim", "n_layer", "n_head") if getattr(self, f) < 1}
        if bad:
            raise ValueError(f"{type(self).__name__}: these fields must be positive integers, got {bad}")
        if self.dim % self.n_head != 0:
            raise ValueError(f"{type(self).__name__}: dim {self.dim} must be divisible by n_head {self.n_head}")
        if self.head_dim % 4 != 0:
            raise ValueError(
                f"{type(self).__name__}: head_dim = dim / n_head = {self.head_dim} must be a multiple of 4 "
                "(2D RoPE gives a quarter of each head to rows and a quarter to columns)"
            )
        probs = ("resid_dropout", "ffn_dropout", "token_dropout", "class_dropout")
        bad = {f: getattr(self, f) for f in probs if not 0.0 <= getattr(self, f) <= 1.0}
        if bad:
            raise ValueError(f"{type(self).__name__}: dropout probabilities must lie in [0, 1], got {bad}")
        if self.rope_base <= 1.0 or self.norm_eps <= 0.0:
            raise ValueError(f"{type(self).__name__}: need rope_base > 1 and norm_eps > 0, got {self.rope_base}, {self.norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


AR_SIZES: dict[str, ARConfig] = {
    "debug": ARConfig(dim=128, n_layer=4, n_head=4),  # seconds on a CPU
    "B": ARConfig(dim=768, n_layer=12, n_head=12),  # GPT-B, 111M
    "L": ARConfig(dim=1024, n_layer=24, n_head=16),  # GPT-L, 343M
    "XL": ARConfig(dim=1280, n_layer=36, n_head=20),  # GPT-XL, 775M
    "XXL": ARConfig(dim=1536, n_layer=48, n_head=24),  # GPT-XXL, 1.4B
}


# --- the model -----------------------------------------------------------------------------


class ARModel(LlamaGenMixin, GenerativeModel):
    """LlamaGen GPT: class token + raster tokens, causal 2D-RoPE transformer, next-token head."""

    def __init__(self, config: ARConfig):
        super().__init__()
        self.config = c = config
        self.build_trunk(c.n_layer)  # cls_embedding, tok_embeddings, tok_dropout, layers, norm, output
        self.register_tables()  # freqs_cis: not in checkpoints, rebuilt after any move or cast
        self.initialize_weights()

    # --- shared pieces of training and sampling ---------------------------------------------
    def _states(
        self, h: torch.Tensor, *, start_pos: int = 0, caches: list[KVCache] | None = None
    ) -> torch.Tensor:
        """Embeddings of positions [start_pos, start_pos + L) (B, L, D) -> final normed states (B, L, D)."""
        freqs = self.freqs_cis[start_pos : start_pos + h.shape[1]]  # (L, K/2, 2)
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            h = layer(h, freqs, kv_cache=cache, start_pos=start_pos)  # (B, L, D)
        return self.norm(h)

    def _logits(
        self, h: torch.Tensor, *, start_pos: int = 0, caches: list[KVCache] | None = None
    ) -> torch.Tensor:
        """Embeddings of positions [start_pos, start_pos + L) (B, L, D) -> float32 logits (B, L, V)."""
        return self.output(self._states(h, start_pos=start_pos, caches=caches)).float()  # (B, L, V)

    def _new_caches(self, batch_size: int) -> list[KVCache]:
        c = self.config
        dtype, device = self.activation_dtype(), self.device
        return [
            KVCache(batch_size, c.n_head, c.seq_len, c.head_dim, dtype=dtype, device=device) for _ in self.layers
        ]

    # --- training ---------------------------------------------------------------------------
    def forward(
        self, batch: dict[str, torch.Tensor], *, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Teacher-forced next-token loss over all N tokens; also next-token accuracy."""
        tokens, labels = self.check_batch(batch)  # (B, N), (B,)
        h = self._embed(tokens[:, :-1], labels=labels, train=self.training, generator=generator)  # (B, N, D)
        return token_loss(self._logits(h), tokens)  # logits (B, N, V)

    # --- sampling ---------------------------------------------------------------------------
    @sampling_entry
    def generate(self, labels: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
        """labels (B,) -> ids (B, G, G): N cached forward passes, constant CFG on all logits.

        cfg_scale == 1 runs the conditional batch alone; otherwise the batch is doubled with
        the null class and logits = uncond + cfg_scale * (cond - uncond). `steps` must be
        None or N (raster AR makes one token per pass).
        """
        c = self.config
        n = c.seq_len
        if opts.steps is not None and opts.steps != n:
            raise ValueError(f"raster AR decodes one token per step: steps must be {n} (or None), got {opts.steps}")
        self.check_generator(opts.generator)
        with self.evaluating():
            labels = self.check_labels(labels)  # (B,)
            b = labels.shape[0]
            if opts.guided:
                labels = with_null_class(labels, self.cls_embedding.null_id)  # (2B,)
            scale = opts.cfg_scale if opts.guided else None
            static, capture = decode_plan(opts.graphs, self)
            if static:
                step = self._static_stepper(labels.shape[0], scale, capture=capture)
            else:
                caches = self._new_caches(labels.shape[0])
            out = torch.empty(b, n, dtype=torch.long, device=labels.device)
            h = self.cls_embedding(labels, train=False)  # (B2, 1, D): prefill the class token
            for i in range(n):
                if static:
                    logits = step(h, i)  # (B, V)
                else:
                    states = self._states(h, start_pos=i, caches=caches)[:, -1]  # (B2, D)
                    logits = head_logits(self.output, states, scale)  # (B, V)
                token = opts.sample(logits)  # (B,)
                out[:, i] = token
                if i + 1 < n:
                    h = self.tok_embeddings(both_halves(token[:, None], opts.guided))  # (B2, 1, D)
            return rearrange(out, "b (r c) -> b r c", r=c.grid_size)

    # --- the static-shape decode step (raygen.models.graphs) ------------------------------------
    def _static_stepper(self, batch_size: int, scale: float | None, *, capture: bool
                        ) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """step(h (B2, 1, D), i) -> logits (B, V) of position i, on fixed-shape `StaticCaches`.

        One step function for all N positions: the position is a tensor, the cache is read whole
        under the causal mask (which also hides every slot not yet written), so with `capture`
        the step is one CUDA graph. The logits are the graph's output buffer: sample from them
        before the next step.
        """
        c = self.config
        dtype, device = self.activation_dtype(), self.device

        def build() -> StaticCaches:
            return StaticCaches(len(self.layers), batch_size, c.n_head, c.seq_len, c.head_dim,
                                dtype=dtype, device=device)

        caches, graphs = step_runner(self, capture=capture, key=("ar", batch_size, dtype, device), build=build)
        caches.reset()

        def fn(h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return head_logits(self.output, self._static_states(h, pos, caches)[:, -1], scale)

        return lambda h, i: graphs(("ar", scale), fn, h, caches.slot_ids[i : i + 1])  # slot i = position i

    def _static_states(self, h: torch.Tensor, pos: torch.Tensor, caches: StaticCaches) -> torch.Tensor:
        """Embeddings (B, L, D) of positions pos (L,) int64 -> final normed states (B, L, D), static shapes."""
        freqs = self.freqs_cis.index_select(0, pos)  # (L, K/2, 2)
        mask = caches.visible(pos, caches.slot_ids[None, :] <= pos[:, None])  # (L, S): causal and written
        for layer, cache in zip(self.layers, caches.layers):
            h = layer(h, freqs, attn_mask=mask, kv_cache=cache, start_pos=pos)  # (B, L, D)
        return self.norm(h)

    @torch.inference_mode()
    def logits_uncached(self, tokens: torch.Tensor, *, labels: torch.Tensor) -> torch.Tensor:
        """Full causal pass over [class, tokens (B, n)], no cache -> logits (B, n + 1, V).

        Row j predicts x_j. Call in eval mode for deterministic values (no dropout).
        """
        h = self._embed(tokens.long(), labels=labels.long(), train=False)  # (B, 1 + n, D)
        return self._logits(h)  # (B, 1 + n, V)

    @torch.inference_mode()
    def logits_cached(self, tokens: torch.Tensor, *, labels: torch.Tensor, graphs: str = "off") -> torch.Tensor:
        """The sampler's path, teacher-forced: prefill + one cached pass per token -> (B, n + 1, V).

        graphs: the decode step's `graphs` mode ("off": the dynamic cache, else the static step).
        """
        h = self._embed(tokens.long(), labels=labels.long(), train=False)  # (B, 1 + n, D)
        static, capture = decode_plan(graphs, self)
        if static:
            step = self._static_stepper(h.shape[0], None, capture=capture)
            return torch.stack([step(h[:, i : i + 1], i).clone() for i in range(h.shape[1])], dim=1)  # (B, 1 + n, V)
        caches = self._new_caches(h.shape[0])
        steps = [self._logits(h[:, i : i + 1], start_pos=i, caches=caches) for i in range(h.shape[1])]
        return torch.cat(steps, dim=1)  # (B, 1 + n, V)


# --- official LlamaGen checkpoints --------------------------------------------------------

# Tensors an official GPT state dict can hold that are not weights here: LlamaGen keeps its
# RoPE table and causal mask as plain attributes (never saved; dropped in case a fork saved
# them), but `setup_caches` registers a KVCache module per layer, so a state dict taken after
# sampling carries `layers.{i}.attention.kv_cache.{k,v}_cache` buffers.
_OFFICIAL_NON_WEIGHTS = ("freqs_cis", "causal_mask")
_OFFICIAL_NON_WEIGHT_SUFFIXES = (".attention.kv_cache.k_cache", ".attention.kv_cache.v_cache")


def from_official(state: dict[str, torch.Tensor], config: ARConfig) -> dict[str, torch.Tensor]:
    """An official LlamaGen c2i GPT state dict -> ARModel's (strict-loadable for `config`).

    `state` is already unwrapped from its container (train_c2i.py saves {"model": ...};
    sample_c2i.py also accepts "module" and "state_dict"). The names already agree, so this
    only drops the non-weights above; unknown keys are kept for a strict load to name. The
    class table must have config.num_classes + 1 rows (LlamaGen trained with class dropout);
    one of num_classes rows (class_dropout_prob 0, no null row) is passed through as it is,
    and a strict load reports the size mismatch.
    """
    return {
        k: v
        for k, v in state.items()
        if k not in _OFFICIAL_NON_WEIGHTS and not k.endswith(_OFFICIAL_NON_WEIGHT_SUFFIXES)
    }


def official_arch(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """The ARConfig fields an official c2i GPT state dict fixes by its shapes.

    -> {dim, n_layer, vocab_size, num_classes}. LlamaGen's class table has num_classes + 1
    rows when class dropout is on (every released c2i model) and num_classes without; shapes
    cannot tell the two apart, so this assumes the null row. n_head, the grid size and the
    RoPE base are not in the weights: take them from the model name (GPT-B/L/XL/XXL = the
    sizes B/L/XL/XXL here) and the image/downsample size.
    """
    key = "cls_embedding.embedding_table.weight"
    if key not in state:
        raise ValueError(f"not a LlamaGen c2i GPT state dict: no {key!r} (a t2i model has cls_embedding.cap_proj)")
    rows, dim = state[key].shape  # (C + 1, D)
    vocab_size, tok_dim = state["tok_embeddings.weight"].shape  # (V, D)
    qkv_rows = state["layers.0.attention.wqkv.weight"].shape[0]  # (3 D, D) unless grouped-query
    if tok_dim != dim or qkv_rows != 3 * dim:
        raise ValueError(
            f"unsupported LlamaGen layout: class table width {dim}, token table width {tok_dim}, "
            f"wqkv rows {qkv_rows} (expected {3 * dim}; n_kv_head != n_head is not supported)"
        )
    layer_ids = {int(k.split(".")[1]) for k in state if k.startswith("layers.")}
    return {"dim": int(dim), "n_layer": max(layer_ids) + 1, "vocab_size": int(vocab_size), "num_classes": int(rows) - 1}


AR_FAMILY = FamilySpec(family="ar", model_cls=ARModel, config_cls=ARConfig, sizes=AR_SIZES,
                       from_official=from_official, official_arch=official_arch)
