"""Family `emigm`: eMIGM, masked generation on continuous tokens with a per-token diffusion head.

The MAR lineage (an MAE encoder/decoder turns each token into a condition z; a small MLP
diffusion head samples each token's value) with eMIGM's training and sampling choices:

- **Encoder.** z_proj(token) for every position, prefixed by `buffer_size` slots that all hold
  the class embedding; learned position embedding; LayerNorm; then the MASKED tokens are
  DROPPED (the MAE trick), so the ViT blocks see the buffer and the known tokens only.
- **Decoder.** decoder_embed, scatter back to the full length with the mask token in the
  masked slots, learned position embedding, ViT blocks, LayerNorm, drop the buffer, add the
  "diffusion position embedding": z (B, L, D), one condition per token.
- **CFG with mask.** The mask token IS `fake_latent`, the null-class embedding: class dropout
  (0.1) puts it in the buffer, and the unconditional branch of guidance uses it.
- **Head** (`DiffusionHead`, MAR's `DiffLoss`): SimpleMLPAdaLN -> [eps, v], 1000-step cosine
  schedule, IDDPM's hybrid loss (`raygen.models.diffusion`), `diffusion_batch_mul` noise draws
  per token, averaged over masked tokens with w(t) = 1.
- **Masking.** One t ~ U(0, 1) per iteration, shared by the batch, clamped to t >= t_min;
  p = (1 - 1e-3) t + 1e-3; a Bernoulli(gamma(p)) pattern over the L positions, redrawn until
  >= 2 are masked; every sample masks that many positions, chosen at random per sample.
- **Sampling.** `steps` mask-prediction iterations on t_k = linspace(1, 1e-5, steps + 1); at
  t -> s each still-masked token is revealed with probability 1 - gamma(s) / gamma(t) (one
  count for the whole batch, at least one, all at the last step) and its value is sampled by
  the head (DPM-Solver++ singlestep order 3 in logSNR, or DDPM with temperature). Guidance
  eps_u + w (eps_c - eps_u) inside the solver, only at steps whose s lies in
  (cfg_t_min, cfg_t_max]; elsewhere one conditional pass (NFE "16 x 1.2").

State-dict names and shapes are the official class's (ML-GSAI/eMIGM, `use_unsup_cfg=True`), so
released weights load as they are (`mask_token` is a copy of `fake_latent`: `_save_mask_token`).
Axis letters: B batch, L tokens, S buffer slots, K kept slots (buffer + unmasked), C token
channels, D width, H heads, E head width, M head rows, W head MLP width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import reduce, repeat
from torch import nn

from raygen.models.base import FamilySpec, GenerativeModel, ModelConfig
from raygen.models.layers import TimestepEmbedder, ViTAttention, modulate  # shared with d2it
from raygen.models.diffusion import Denoiser, Guidance, Schedule, diffusion_loss, dpm_solver_pp_sample, ddpm_sample
from raygen.models.diffusion.samplers import SampleOut
from raygen.models.sampling import SamplingOptions, sampling_entry

GAMMA = {  # mask schedules gamma(p), the masked fraction at time p
    "exp": lambda p: 1 - torch.exp(-5 * p),  # eMIGM's default
    "cosine": lambda p: torch.cos(math.pi / 2 * (1 - p)),
    "linear": lambda p: p,
    "log": lambda p: torch.log(1 + (math.exp(5) - 1) * p) / 5,
    "poly-0.5": lambda p: p**0.5,
}
MASK_SCHEDULES = tuple(GAMMA)
CFG_SCHEDULES = ("constant", "linear")
SAMPLERS = ("dpm-solver", "ddpm")
DEFAULT_STEPS = 16  # mask-prediction iterations: the paper's headline "16 x 1.2" setting
P_EPS = 1e-3  # p = (1 - P_EPS) t + P_EPS keeps the training mask ratio above 0
T_END = 1e-5  # sampling time runs from 1 down to T_END


# --- masking schedules (pure functions) ---------------------------------------------------


def mask_ratio(schedule: str, p: torch.Tensor | float) -> torch.Tensor:
    """gamma(p): the probability that a token is masked at time p in [0, 1] (float64 for a Python p)."""
    if schedule not in GAMMA:
        raise ValueError(f"unknown mask schedule '{schedule}'; known: {', '.join(MASK_SCHEDULES)}")
    return GAMMA[schedule](torch.as_tensor(p, dtype=None if torch.is_tensor(p) else torch.float64))


def mask_time(t: torch.Tensor | float) -> torch.Tensor | float:
    """Training time t -> p = (1 - 1e-3) t + 1e-3."""
    return (1 - P_EPS) * t + P_EPS


def random_mask(batch: int, seq_len: int, *, schedule: str, t_min: float,
                generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """eMIGM's training mask (B, L) bool, True = masked: one t for the batch, the same count per sample.

    t ~ U(0, 1) clamped to >= t_min; n = the masked count of one Bernoulli(gamma(p)) pattern,
    redrawn until n >= 2; each sample then masks n positions chosen uniformly (the official
    code permutes the one pattern per sample, which is the same distribution).
    """
    if seq_len < 2:
        raise ValueError(f"eMIGM masks at least 2 tokens; seq_len is {seq_len}")
    while True:
        t = torch.rand((), generator=generator, device=device).clamp(min=t_min)
        gamma = mask_ratio(schedule, mask_time(t))
        n = int((torch.rand(seq_len, generator=generator, device=device) < gamma).sum())
        if n >= 2:
            break
    order = torch.rand(batch, seq_len, generator=generator, device=device).argsort(dim=1)  # (B, L)
    return torch.zeros(batch, seq_len, dtype=torch.bool, device=device).scatter_(1, order[:, :n], True)


def reveal_probability(schedule: str, t: float, s: float) -> float:
    """Sampling t -> s: the probability that a still-masked token is revealed, 1 - gamma(s) / gamma(t)."""
    return float(1 - mask_ratio(schedule, s) / mask_ratio(schedule, t))


# --- ViT blocks (timm's Block, under its names) ----------------------------------------------


class ViTBlock(nn.Module):
    """Pre-LN ViT block (LayerNorm eps 1e-6): x + attn(norm1(x)), then h + mlp(norm2(h))."""

    def __init__(self, dim: int, n_head: int, *, mlp_ratio: float, attn_dropout: float, proj_dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, n_head, attn_dropout=attn_dropout, proj_dropout=proj_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, hidden), "fc2": nn.Linear(hidden, dim)})
        self.drop = nn.Dropout(proj_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (B, L, D)
        h = self.drop(F.gelu(self.mlp["fc1"](self.norm2(x))))  # (B, L, 4D)
        return x + self.drop(self.mlp["fc2"](h))


# --- the diffusion head (MAR's SimpleMLPAdaLN and DiffLoss) -----------------------------------


class ResBlock(nn.Module):
    """x + gate * mlp(modulate(LN(x), shift, scale)), shift/scale/gate from y (adaLN, zero-init)."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)  # (M, W) each
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (M, 2C)


class SimpleMLPAdaLN(nn.Module):
    """The per-token denoiser: (x_t (M, C), step labels t (M,), condition z (M, D)) -> [eps, v] (M, 2C)."""

    def __init__(self, channels: int, width: int, z_dim: int, depth: int):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_dim, width)
        self.input_proj = nn.Linear(channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x)  # (M, W)
        y = self.time_embed(t) + self.cond_embed(c)  # (M, W)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)  # (M, 2C)


class DiffusionHead(nn.Module):
    """MAR's DiffLoss: `forward(target, z)` -> per-row losses; `sample(z_c, z_u, ...)` -> token values.

    The diffusion arithmetic (timestep embedding, q_sample, schedule terms, the loss, the
    solver) runs in float32 whatever autocast does to the MLP's matmuls: MAR's users saw NaN
    losses and black samples with it under half precision (LTH14/mar #29, #36, #76).
    """

    def __init__(self, channels: int, z_dim: int, *, width: int, depth: int, num_steps: int = 1000):
        super().__init__()
        self.channels = channels
        self.net = SimpleMLPAdaLN(channels, width, z_dim, depth)
        with torch.device("cpu"):  # float64 tables on the CPU, not parameters (even under a meta device)
            self.schedule = Schedule.named("cosine", num_steps)
        self._respaced: dict[int, Schedule] = {}

    def _eps_v(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, c).float()  # (M, 2C) float32

    def forward(self, target: torch.Tensor, z: torch.Tensor, *,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """target (M, C), z (M, D) -> {"loss", "mse", "vb"} per row (M,), float32 (one step and noise per row)."""
        x0 = target.float()
        k = self.schedule.sample_steps(len(x0), generator=generator, device=x0.device)  # (M,)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)  # (M, C)
        x_t = self.schedule.q_sample(x0, k, noise)
        terms = diffusion_loss(self.schedule, self._eps_v(x_t, k, z), x0=x0, x_t=x_t, k=k, noise=noise)
        return {name: reduce(v, "m c -> m", "mean") for name, v in terms.items()}

    def sample(self, z_c: torch.Tensor, z_u: torch.Tensor | None, *, guidance: Guidance, sampler: str, steps: int,
               order: int, temperature: float, generator: torch.Generator | None) -> SampleOut:
        """Token values (M, C) for conditions z_c (M, D) (z_u: the unconditional ones, for guidance)."""
        den = Denoiser(self._eps_v, cond=z_c, uncond=z_u, guidance=guidance, learned_variance=True,
                       num_train_steps=self.schedule.num_train_steps)
        x_T = torch.randn(len(z_c), self.channels, generator=generator, device=z_c.device)  # (M, C)
        if sampler == "dpm-solver":  # an ODE: temperature does not apply (as in eMIGM)
            return dpm_solver_pp_sample(self.schedule, den, x_T, steps=steps, order=order, method="singlestep")
        if steps not in self._respaced:
            self._respaced[steps] = self.schedule.respace(str(steps))
        return ddpm_sample(self._respaced[steps], den, x_T, temperature=temperature, generator=generator)


# --- config and sizes ------------------------------------------------------------------------


@dataclasses.dataclass
class EMIGMConfig(ModelConfig):
    """eMIGM hyperparameters (defaults: eMIGM-XS at 256 px on KL-16 latents, ImageNet classes)."""

    vocab_size: int = 1  # unused: the data are continuous latents
    token_dim: int = 16  # C, channels per token (KL-16: 16; DC-AE f32c32: 32; pixels: p*p*channels)
    dim: int = 448  # D, encoder = decoder width
    depth: int = 10  # encoder blocks; the decoder has as many (the paper's "blocks" is the sum)
    n_head: int = 8
    mlp_ratio: float = 4.0
    buffer_size: int = 64  # S class-embedding slots in front of the tokens
    head_depth: int = 3  # ResBlocks of the diffusion MLP
    head_width: int = 1024
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    class_dropout: float = 0.1  # the class embedding becomes fake_latent (CFG with mask)
    mask_schedule: str = "exp"  # training mask ratio gamma(p), one of MASK_SCHEDULES
    t_min: float = 0.2  # time truncation: training t >= t_min
    diffusion_batch_mul: int = 4  # noise draws per masked token and step
    diffusion_steps: int = 1000  # T of the cosine schedule

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"EMIGMConfig: mask_schedule must be one of {MASK_SCHEDULES}, got {self.mask_schedule!r}")
        small = [f for f in ("token_dim", "depth", "head_depth", "head_width", "diffusion_batch_mul",
                             "buffer_size", "n_head") if getattr(self, f) < 1]
        if small or self.dim % self.n_head or not 0 <= self.t_min < 1 or self.seq_len < 2:
            raise ValueError(f"EMIGMConfig: need {', '.join(small) or 'sizes'} >= 1, dim % n_head == 0, "
                             f"0 <= t_min < 1 and >= 2 tokens; got {self}")

    @property
    def n_layer(self) -> int:
        """Encoder + decoder blocks."""
        return 2 * self.depth


EMIGM_SIZES: dict[str, EMIGMConfig] = {
    # [I] debug: a 16-slot buffer (not 64) keeps an 8x8 grid's sequence short on a CPU
    "debug": EMIGMConfig(dim=64, depth=2, n_head=4, head_depth=2, head_width=128, buffer_size=16),
    "XS": EMIGMConfig(dim=448, depth=10, n_head=8, head_depth=3, head_width=1024),  # 69.0M
    "S": EMIGMConfig(dim=512, depth=12, n_head=8, head_depth=3, head_width=1024),  # 96.6M
    "B": EMIGMConfig(dim=768, depth=12, n_head=12, head_depth=6, head_width=1024),  # 207.9M
    "L": EMIGMConfig(dim=1024, depth=16, n_head=16, head_depth=8, head_width=1280),  # 478.3M
    "H": EMIGMConfig(dim=1280, depth=20, n_head=16, head_depth=12, head_width=1536),  # 942.4M
}


# --- the model -------------------------------------------------------------------------------


class EMIGMModel(GenerativeModel):
    """eMIGM: MAE encoder/decoder over continuous tokens (B, L, C) -> per-token z -> diffusion head."""

    def __init__(self, config: EMIGMConfig):
        super().__init__()
        self.config = c = config
        n = c.seq_len + c.buffer_size
        self.fake_latent = nn.Parameter(torch.zeros(1, c.dim))  # null class = mask token
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n, c.dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n, c.dim))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, c.seq_len, c.dim))
        self.class_emb = nn.Embedding(c.num_classes, c.dim)
        self.z_proj = nn.Linear(c.token_dim, c.dim)
        self.z_proj_ln = nn.LayerNorm(c.dim, eps=1e-6)
        block = dict(mlp_ratio=c.mlp_ratio, attn_dropout=c.attn_dropout, proj_dropout=c.proj_dropout)
        self.encoder_blocks = nn.ModuleList(ViTBlock(c.dim, c.n_head, **block) for _ in range(c.depth))
        self.encoder_norm = nn.LayerNorm(c.dim, eps=1e-6)
        self.decoder_embed = nn.Linear(c.dim, c.dim)
        self.decoder_blocks = nn.ModuleList(ViTBlock(c.dim, c.n_head, **block) for _ in range(c.depth))
        self.decoder_norm = nn.LayerNorm(c.dim, eps=1e-6)
        self.diffloss = DiffusionHead(c.token_dim, c.dim, width=c.head_width, depth=c.head_depth,
                                      num_steps=c.diffusion_steps)
        self.register_state_dict_post_hook(_save_mask_token)
        self.register_load_state_dict_pre_hook(_load_mask_token)
        self.last_sampling: dict[str, int] = {}  # counts of the last generate() (see there)
        self.last_forward_passes = 0  # its mask-prediction steps (the NFE of "16 x 1.2")
        self.initialize_weights()

    def class_tables(self) -> dict[str, tuple[int, int]]:
        return {"class_emb.weight": (0, self.config.num_classes)}  # the null class is fake_latent

    @property
    def mask_token(self) -> nn.Parameter:
        """The decoder's mask token: the same tensor as fake_latent (CFG with mask)."""
        return self.fake_latent

    def initialize_weights(self) -> None:
        """Official init: N(0, .02) embeddings, xavier-uniform Linear, unit LayerNorm; the head's
        time MLP N(0, .02) and its adaLN and output layers zero (adaLN-Zero)."""
        for p in (self.class_emb.weight, self.fake_latent, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        net = self.diffloss.net
        for lin in net.time_embed.mlp[0], net.time_embed.mlp[2]:
            nn.init.normal_(lin.weight, std=0.02)
        for lin in [b.adaLN_modulation[-1] for b in net.res_blocks] + [net.final_layer.adaLN_modulation[-1],
                                                                        net.final_layer.linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # --- the MAE encoder/decoder -------------------------------------------------------------
    def _kept(self, mask: torch.Tensor) -> torch.Tensor:
        """Mask (B, L) bool with the same count per row -> indices (B, K) of buffer + unmasked slots, ascending."""
        counts = mask.sum(dim=1)
        if (counts != counts[0]).any():
            raise ValueError("every sample must mask the same number of tokens (MAE gather)")
        buffered = F.pad(mask, (self.config.buffer_size, 0))  # (B, S + L)
        keep = buffered.shape[1] - int(counts[0])
        return torch.argsort(buffered.to(torch.uint8), dim=1, stable=True)[:, :keep]  # (B, K)

    def encode(self, x: torch.Tensor, mask: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens x (B, L, C), mask (B, L), class embeddings cls (B, D) -> kept slots (B, K, D), indices (B, K)."""
        h = self.z_proj(x)  # (B, L, D)
        buf = repeat(cls, "b d -> b s d", s=self.config.buffer_size).to(h.dtype)
        h = self.z_proj_ln(torch.cat([buf, h], dim=1) + self.encoder_pos_embed_learned)  # (B, S + L, D)
        kept = self._kept(mask)  # (B, K)
        h = h.gather(1, repeat(kept, "b k -> b k d", d=h.shape[-1]))  # (B, K, D): masked tokens dropped
        for block in self.encoder_blocks:
            h = block(h)
        return self.encoder_norm(h), kept

    def decode(self, h: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Encoded kept slots (B, K, D) at indices kept (B, K) -> per-token conditions z (B, L, D)."""
        h = self.decoder_embed(h)  # (B, K, D)
        b, n = h.shape[0], self.config.buffer_size + self.config.seq_len
        full = self.mask_token.to(h.dtype).expand(b, n, -1)  # (B, S + L, D): the mask token everywhere
        full = full.scatter(1, repeat(kept, "b k -> b k d", d=h.shape[-1]), h) + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            full = block(full)
        z = self.decoder_norm(full)[:, self.config.buffer_size:]  # (B, L, D)
        return z + self.diffusion_pos_embed_learned

    def condition(self, x: torch.Tensor, mask: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """The MAE pass: tokens (B, L, C), mask (B, L) True = masked, class embeddings (B, D) -> z (B, L, D)."""
        return self.decode(*self.encode(x, mask, cls))

    def class_embedding(self, labels: torch.Tensor, *, drop: bool = False,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """labels (B,) -> (B, D); with drop, each row is fake_latent with probability class_dropout."""
        emb = self.class_emb(labels)  # (B, D)
        if drop and self.config.class_dropout > 0:
            dropped = torch.rand(len(labels), generator=generator, device=emb.device) < self.config.class_dropout
            emb = torch.where(dropped[:, None], self.fake_latent.to(emb.dtype), emb)
        return emb

    # --- training ------------------------------------------------------------------------------
    def check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, L, C) -> float32 (B, L, C); another shape raises."""
        c = self.config
        if latents.ndim != 3 or tuple(latents.shape[1:]) != (c.seq_len, c.token_dim):
            raise ValueError(f"expected latents (B, {c.seq_len}, {c.token_dim}), got {tuple(latents.shape)}")
        return latents.float()

    def forward(self, batch: dict[str, torch.Tensor], *,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """batch {"latents": (B, L, C), "label": (B,)} -> {"loss", "mse", "vb", "mask_ratio"}.

        [I] The head runs on the masked tokens only (the official code runs it on every token
        and zeroes the unmasked rows' losses): the same loss, without the wasted rows.
        """
        c = self.config
        x, labels = self.check_latents(batch["latents"]), batch["label"].long().reshape(-1)  # (B, L, C), (B,)
        mask = random_mask(len(x), c.seq_len, schedule=c.mask_schedule, t_min=c.t_min,
                           generator=generator, device=x.device)  # (B, L)
        cls = self.class_embedding(labels, drop=self.training, generator=generator)  # (B, D)
        z = self.condition(x, mask, cls)  # (B, L, D)
        rows = lambda t: repeat(t[mask], "m d -> (r m) d", r=c.diffusion_batch_mul)  # noqa: E731 - (R M, .)
        terms = self.diffloss(rows(x), rows(z), generator=generator)  # per row (R M,)
        out = {name: v.mean() for name, v in terms.items()}
        out["mse"], out["vb"] = out["mse"].detach(), out["vb"].detach()
        out["mask_ratio"] = mask.float().mean()
        return out

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The official AdamW groups: no decay on 1-D params, biases, or anything in the diffusion head."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                skip = p.ndim < 2 or name.endswith(".bias") or name.startswith("diffloss.")
                (no_decay if skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample (6 P tokens + 12 depth D tokens^2 per transformer, 6 P rows for the head).

        The encoder sees S + L (1 - r) slots, the decoder S + L, the head r L diffusion_batch_mul
        rows; r is the expected mask ratio under the training schedule and t_min.
        """
        c = self.config
        t = torch.linspace(0, 1, 1001, dtype=torch.float64).clamp(min=c.t_min)
        r = float(mask_ratio(c.mask_schedule, mask_time(t)).mean())
        count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
        n_enc, n_dec = c.buffer_size + c.seq_len * (1 - r), c.buffer_size + c.seq_len
        flops = 6 * (count(self.encoder_blocks) * n_enc + count(self.decoder_blocks) * n_dec)
        flops += 12 * c.depth * c.dim * (n_enc**2 + n_dec**2)
        return float(flops + 6 * count([self.diffloss]) * r * c.seq_len * c.diffusion_batch_mul)

    # --- sampling -------------------------------------------------------------------------------
    @sampling_entry
    def generate(self, labels: torch.Tensor, opts: SamplingOptions, *, mask_schedule: str = "exp",
                 sampler: str = "dpm-solver", solver_steps: int = 8, solver_order: int = 3,
                 cfg_schedule: str = "constant", cfg_t_min: float = 0.1, cfg_t_max: float = 0.3) -> torch.Tensor:
        """labels (B,) -> latents (B, L, C) float32 after `steps` mask-prediction iterations (default 16).

        mask_schedule: gamma of the reveal probabilities (MASK_SCHEDULES; the paper samples with exp).
        sampler: "dpm-solver" (DPM-Solver++ singlestep, `solver_order`, `solver_steps` NFE, no
        temperature) or "ddpm" (`solver_steps` respaced ancestral steps, noise x temperature).
        cfg_schedule: "constant" w, or "linear" 1 + (w - 1) * (tokens known after the step) / L.
        Guidance runs at the steps whose s lies in (cfg_t_min, cfg_t_max]; defaults: the paper's
        16-step setting for XS/S/B/L. [I] top_k / top_p (no ids to filter) and a temperature on
        the DPM-Solver path (the official code ignores it there) raise instead of passing silently.
        Sets `last_sampling`: mask steps run, MAE passes and head evaluations (nfe, passes), per batch.
        """
        c, generator = self.config, opts.generator
        self.check_generator(generator)
        steps = DEFAULT_STEPS if opts.steps is None else opts.steps
        checks = ((mask_schedule, MASK_SCHEDULES, "mask_schedule"), (sampler, SAMPLERS, "sampler"),
                  (cfg_schedule, CFG_SCHEDULES, "cfg_schedule"))
        for value, known, what in checks:
            if value not in known:
                raise ValueError(f"unknown {what} '{value}'; known: {', '.join(known)}")
        if opts.top_k != 0 or opts.top_p != 1.0:
            raise ValueError("top_k and top_p filter token ids; eMIGM's tokens are continuous (leave them at 0 / 1)")
        if sampler == "dpm-solver" and opts.temperature != 1.0:
            raise ValueError("temperature applies to sampler='ddpm' only: DPM-Solver++ integrates an ODE")
        if steps < 1 or solver_steps < 1 or not 0 <= cfg_t_min < cfg_t_max <= 1:
            raise ValueError(f"need steps, solver_steps >= 1 and 0 <= cfg_t_min < cfg_t_max <= 1, got steps={steps}, "
                             f"solver_steps={solver_steps}, cfg interval ({cfg_t_min}, {cfg_t_max}]")
        with self.evaluating():
            labels = self.check_labels(labels)  # (B,)
            b, n, dev = len(labels), c.seq_len, labels.device
            tokens = torch.zeros(b, n, c.token_dim, device=dev)  # (B, L, C)
            mask = torch.ones(b, n, dtype=torch.bool, device=dev)  # (B, L): True = still masked
            cls, null = self.class_embedding(labels), self.fake_latent.expand(b, -1)  # (B, D) each
            times = torch.linspace(1.0, T_END, steps + 1).tolist()
            stats = {"mask_steps": 0, "passes": 0, "head_nfe": 0, "head_passes": 0}
            for k in range(steps):
                masked = int(mask[0].sum())
                if masked == 0:
                    break
                t, s = times[k], times[k + 1]
                reveal_n = masked if k == steps - 1 else self._reveal_count(masked, mask_schedule, t, s, generator)
                guided = opts.guided and cfg_t_min < s <= cfg_t_max
                if guided:  # one pass on the doubled batch [cond; uncond]
                    z = self.condition(torch.cat([tokens, tokens]), torch.cat([mask, mask]), torch.cat([cls, null]))
                    z_c, z_u = z.chunk(2)  # (B, L, D) each
                else:
                    z_c, z_u = self.condition(tokens, mask, cls), None
                scores = torch.rand(b, n, generator=generator, device=dev).masked_fill(~mask, 2.0)  # (B, L)
                reveal = torch.zeros_like(mask).scatter_(1, scores.argsort(dim=1)[:, :reveal_n], True)  # (B, L)
                mask = mask & ~reveal
                w = opts.cfg_scale
                if cfg_schedule == "linear":
                    w = 1 + (w - 1) * (n - (masked - reveal_n)) / n
                out = self.diffloss.sample(
                    z_c[reveal], None if z_u is None else z_u[reveal], guidance=Guidance(w if guided else 1.0),
                    sampler=sampler, steps=solver_steps, order=solver_order, temperature=opts.temperature,
                    generator=generator)  # x (B reveal_n, C), rows in (sample, position) order
                tokens[reveal] = out.x.to(tokens.dtype)
                for key, add in zip(stats, (1, 2 if guided else 1, out.nfe, out.passes)):
                    stats[key] += add
            self.last_sampling, self.last_forward_passes = stats, stats["mask_steps"]
            return tokens

    def _reveal_count(self, masked: int, schedule: str, t: float, s: float, generator: torch.Generator | None) -> int:
        """Tokens to reveal at t -> s: Binomial(masked, 1 - gamma(s)/gamma(t)) from one draw per position,
        shared by the batch (the official rule), at least 1."""
        p = reveal_probability(schedule, t, s)
        draws = torch.rand(masked, generator=generator, device=self.device)
        return max(1, int((draws < p).sum()))


# --- official state-dict layout ----------------------------------------------------------------


def _save_mask_token(module: EMIGMModel, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """Add `mask_token` (= fake_latent) right after `encoder_pos_embed_learned`, the official order.

    [I] One parameter, two keys: registering the tensor twice would be lost by `to_empty` and
    would let a stale `mask_token` overwrite an EMA'd `fake_latent` on load; so only
    fake_latent is a parameter and mask_token exists in state dicts only.
    """
    keys = list(state)
    at = keys.index(prefix + "encoder_pos_embed_learned") + 1
    tail = [(k, state.pop(k)) for k in keys[at:]]
    state[prefix + "mask_token"] = state[prefix + "fake_latent"]
    state.update(tail)


def _load_mask_token(module: EMIGMModel, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Read `mask_token` into fake_latent when fake_latent is absent; otherwise fake_latent wins."""
    token = state.pop(prefix + "mask_token", None)
    if token is not None and prefix + "fake_latent" not in state:
        state[prefix + "fake_latent"] = token


def from_official(state: dict[str, torch.Tensor], config: EMIGMConfig) -> dict[str, torch.Tensor]:
    """An official eMIGM state dict -> this model's: the same names and shapes (its `mask_token`
    is read into fake_latent by the load hook above), so only a copy."""
    return dict(state)


def official_arch(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The EMIGMConfig fields an official state dict's shapes fix (KeyError if it is not one)."""
    dim, token_dim = state["z_proj.weight"].shape  # (D, C)
    seq_len = state["diffusion_pos_embed_learned"].shape[1]  # N = grid**2
    grid = math.isqrt(seq_len)

    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)})

    return {"dim": int(dim), "token_dim": int(token_dim), "grid_size": grid, "depth": count("encoder_blocks."),
            "num_classes": int(state["class_emb.weight"].shape[0]),
            "buffer_size": int(state["encoder_pos_embed_learned"].shape[1] - seq_len),
            "head_depth": count("diffloss.net.res_blocks."),
            "head_width": int(state["diffloss.net.res_blocks.0.in_ln.weight"].shape[0])}


EMIGM_FAMILY = FamilySpec(family="emigm", model_cls=EMIGMModel, config_cls=EMIGMConfig, sizes=EMIGM_SIZES,
                          from_official=from_official, official_arch=official_arch,
                          official_keys=("model_ema", "model", "state_dict"))
