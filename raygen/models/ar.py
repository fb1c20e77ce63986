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

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from raygen.models.base import FamilySpec, GenerativeModel, ModelConfig
from raygen.models.layers import (
    KVCache,
    LabelEmbedder,
    RMSNorm,
    TransformerBlock,
    init_llamagen_weights_,
    precompute_freqs_cis_2d,
)
from raygen.models.sampling import cfg_mix, sample_logits

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


class ARModel(GenerativeModel):
    """LlamaGen GPT: class token + raster tokens, causal 2D-RoPE transformer, next-token head."""

    def __init__(self, config: ARConfig):
        super().__init__()
        self.config = config
        c = config
        self.cls_embedding = LabelEmbedder(c.num_classes, c.dim, c.class_dropout)
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.tok_dropout = nn.Dropout(c.token_dropout)
        self.layers = nn.ModuleList(
            TransformerBlock(
                c.dim, c.n_head, resid_dropout=c.resid_dropout, ffn_dropout=c.ffn_dropout, norm_eps=c.norm_eps
            )
            for _ in range(c.n_layer)
        )
        self.norm = RMSNorm(c.dim, eps=c.norm_eps)
        self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        # Not saved in checkpoints (like LlamaGen's plain attribute) and rebuilt by `_apply`.
        self.register_buffer("freqs_cis", self._rope_table(device=None), persistent=False)
        self.initialize_weights()

    # --- init -----------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """LlamaGen init: N(0, 0.02) Linear/Embedding weights, unit norms, zero output head."""
        init_llamagen_weights_(self)
        nn.init.zeros_(self.output.weight)
        self.freqs_cis = self._rope_table(device=self.freqs_cis.device)

    def _rope_table(self, *, device: torch.device | None) -> torch.Tensor:
        c = self.config
        return precompute_freqs_cis_2d(c.grid_size, c.head_dim, c.rope_base, cls_token_num=1, device=device)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        # .to(bf16) would round the cos/sin table and to_empty() would leave it garbage:
        # recompute it in float32 on the buffer's new device after any move or cast.
        super()._apply(fn, recurse)
        self.freqs_cis = self._rope_table(device=self.freqs_cis.device)
        return self

    # --- shared pieces of training and sampling ---------------------------------------------
    def _embed(
        self,
        tokens: torch.Tensor,
        *,
        labels: torch.Tensor,
        train: bool,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """[class token, tokens] -> (B, 1 + n, D) input embeddings."""
        cond = self.cls_embedding(labels, train=train, generator=generator)  # (B, 1, D)
        h = torch.cat([cond, self.tok_embeddings(tokens)], dim=1)  # (B, 1 + n, D)
        return self.tok_dropout(h)

    def _logits(
        self, h: torch.Tensor, *, start_pos: int = 0, caches: list[KVCache] | None = None
    ) -> torch.Tensor:
        """Embeddings of positions [start_pos, start_pos + L) (B, L, D) -> float32 logits (B, L, V)."""
        freqs = self.freqs_cis[start_pos : start_pos + h.shape[1]]  # (L, K/2, 2)
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            h = layer(h, freqs, kv_cache=cache, start_pos=start_pos)  # (B, L, D)
        return self.output(self.norm(h)).float()  # (B, L, V)

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
        tokens = batch["tokens"].long()
        if tokens.ndim == 3:
            tokens = rearrange(tokens, "b r c -> b (r c)")  # (B, N)
        if tokens.shape[1] != self.config.seq_len:
            raise ValueError(f"expected {self.config.seq_len} tokens per sample, got {tuple(tokens.shape)}")
        labels = batch["label"].long().reshape(-1)  # (B,)
        h = self._embed(tokens[:, :-1], labels=labels, train=self.training, generator=generator)  # (B, N, D)
        logits = self._logits(h)  # (B, N, V)
        loss = F.cross_entropy(rearrange(logits, "b n v -> (b n) v"), rearrange(tokens, "b n -> (b n)"))
        with torch.no_grad():
            acc = (logits.argmax(dim=-1) == tokens).float().mean()
        return {"loss": loss, "acc": acc}

    # --- sampling ---------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        labels: torch.Tensor,
        *,
        cfg_scale: float = 1.0,
        steps: int | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """labels (B,) -> ids (B, G, G): N cached forward passes, constant CFG on all logits.

        cfg_scale == 1 runs the conditional batch alone; otherwise the batch is doubled with
        the null class and logits = uncond + cfg_scale * (cond - uncond). `steps` must be
        None or N (raster AR makes one token per pass).
        """
        c = self.config
        n = c.seq_len
        if steps is not None and steps != n:
            raise ValueError(f"raster AR decodes one token per step: steps must be {n} (or None), got {steps}")
        self.check_generator(generator)
        with self.evaluating():
            labels = self.check_labels(labels)  # (B,)
            guided = cfg_scale != 1.0
            if guided:
                labels = torch.cat([labels, torch.full_like(labels, self.cls_embedding.null_id)])  # (2B,)
            b = labels.shape[0] // 2 if guided else labels.shape[0]
            caches = self._new_caches(labels.shape[0])
            out = torch.empty(b, n, dtype=torch.long, device=labels.device)
            h = self.cls_embedding(labels, train=False)  # (B2, 1, D): prefill the class token
            for i in range(n):
                logits = self._logits(h, start_pos=i, caches=caches)[:, -1]  # (B2, V)
                if guided:
                    cond, uncond = logits.chunk(2)
                    logits = cfg_mix(cond, uncond, cfg_scale)  # (B, V)
                token = sample_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
                out[:, i] = token  # (B,)
                if i + 1 < n:
                    fed = repeat(token, "b -> (two b) 1", two=2) if guided else rearrange(token, "b -> b 1")
                    h = self.tok_embeddings(fed)  # (B2, 1, D)
            return rearrange(out, "b (r c) -> b r c", r=c.grid_size)

    @torch.inference_mode()
    def logits_uncached(self, tokens: torch.Tensor, *, labels: torch.Tensor) -> torch.Tensor:
        """Full causal pass over [class, tokens (B, n)], no cache -> logits (B, n + 1, V).

        Row j predicts x_j. Call in eval mode for deterministic values (no dropout).
        """
        h = self._embed(tokens.long(), labels=labels.long(), train=False)  # (B, 1 + n, D)
        return self._logits(h)  # (B, 1 + n, V)

    @torch.inference_mode()
    def logits_cached(self, tokens: torch.Tensor, *, labels: torch.Tensor) -> torch.Tensor:
        """The sampler's path, teacher-forced: prefill + one cached pass per token -> (B, n + 1, V)."""
        h = self._embed(tokens.long(), labels=labels.long(), train=False)  # (B, 1 + n, D)
        caches = self._new_caches(h.shape[0])
        steps = [self._logits(h[:, i : i + 1], start_pos=i, caches=caches) for i in range(h.shape[1])]
        return torch.cat(steps, dim=1)  # (B, 1 + n, V)


AR_FAMILY = FamilySpec(family="ar", model_cls=ARModel, config_cls=ARConfig, sizes=AR_SIZES)
