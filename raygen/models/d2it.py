"""Family `d2it`: D2iT's Dynamic Content Transformer (DCT), a DiT over a multi-grained latent.

D2iT (arXiv 2504.09454) encodes an image with a Dynamic VAE whose regions carry different
downsampling factors, then denoises that multi-grained latent with a DiT. No official code
is public: the paper gives the parts by name, raygen fixes the rest. [P] = the paper states
it, [I] = raygen's choice.

Data (one image) [I]. Two grains [P]: coarse latents x_c (C, h, w) at factor f (16 at 256 px),
fine latents x_f (C, 2h, 2w) at f/2, and a grain map g (h, w) on the coarse grid, 1 = fine
(the paper writes 1 = coarse, 2 = fine). A coarse cell is represented by its coarse latent
where g = 0 and by its 2x2 fine latents where g = 1; the other grain's values at that cell
are not part of the sample and never reach the network or the loss.

- **Routing in** [P: "routing module"; the layout is I]. One token per coarse cell:
  Linear(C -> D)(x_c) where coarse, Linear(4C -> D)(the cell's 2x2 fine latents, flattened in
  (row, col, channel) order) where fine, + a learned grain embedding (2, D) + DiT's fixed 2-D
  sin-cos position embedding ([I] recomputed in float32 each call, neither parameter nor buffer,
  so casts, meta builds and to_empty cannot spoil it; DiT stores it as a frozen Parameter). So
  the DiT sees N = h w tokens whatever the grain map.
- **DiT blocks** exactly as DiT [P: "a DiT backbone"]: adaLN-Zero on c = t_embedder(t) +
  y_embedder(y) (256-d sinusoid -> MLP; a null class row for CFG), LayerNorm without affine
  (eps 1e-6), attention with qkv bias, GELU(tanh) MLP x4, a 6D modulation, zero gates. The
  names (t_embedder, y_embedder.embedding_table, blocks.i.attn.qkv, ...) and shapes are DiT's,
  so at L and XL this trunk is DiT-L/XL's minus the patch embedding and the (patch-1) output.
- **Coarse output**: DiT's final layer (adaLN-Zero) -> [eps, v] (2C) per coarse cell.
- **RefineNet** [P: blocks with learnable position embeddings on the fine tokens; the layout
  is I]: each DiT output token is projected to the width R and copied to its 4 sub-positions,
  + a learnable sub-position embedding (4, R) + a learnable fine-grid position embedding
  (4N, R) (initialised to the fine grid's sin-cos table), + a projection of the cell's own
  noisy fine latent where the cell is fine (nothing where it is coarse); `refine_depth`
  adaLN-Zero blocks of width R conditioned on the same c attend over the WHOLE fine grid
  (4N tokens); a final layer -> a 2C correction per fine position.
- **Multi-grained noise** [P: coarse noise everywhere, corrected in fine regions]: the fine
  prediction is nearest-upsample(coarse [eps, v]) + the RefineNet correction [I: the learned
  variance channels get the same residual form]. At init both heads are zero (adaLN-Zero),
  so eps_hat = 0 on both grids.

Training [I: DiT's recipe; the paper gives no diffusion details]. One step k per image,
shared by both grains; eps_c, eps_f independent N(0, I); x_c and x_f are noised on their full
grids (values outside the represented grain are noised too but never read). IDDPM's hybrid
loss (eps MSE + VLB for the learned variance, `raygen.models.diffusion`) per element; the
**dynamic grain loss** [P: named; form I] = mean over the batch's coarse-region cells of the
coarse loss + fine_loss_weight * mean over the batch's fine-region fine positions of the fine
loss. Each grain is averaged on its own, so the fine ratio does not tilt the objective; [I] the
means pool the whole batch (not per image first); an empty grain contributes 0 (its path stays
in the graph with zero gradient, so DDP sees no unused parameters). [I] The coarse head is NOT
trained against eps_c in fine cells: the token of a fine cell is built from x_f only, so eps_c
there is not identifiable (the MSE would pull the coarse output at fine cells to 0 and fight
the fine path); there the coarse output is the base the RefineNet corrects, trained through
the fine loss.

Sampling. The two grids are one state (B, C, N + 4N) for the diffusion package's samplers:
DDPM with learned variance (steps respaced, default 250, as DiT) or DDIM; classifier-free
guidance eps_u + w (eps_c - eps_u) on every eps channel of both grains (`Guidance`, the null
class; the grain map is the same in both halves). The grain map is required (the paper's
Dynamic Grain Transformer predicts it from the class; it is a separate model). Unrepresented
values are returned as zeros.

Sizes [P: "follow DiT"; D2iT-B = 10 DiT + 2 RefineNet blocks is the paper's best B]: counts at
grid 16, C = 4 (SD-VAE-like latents, DiT's comparison), 1000 classes, in `D2IT_SIZES`.
Axis letters: B batch, N coarse cells (h w), F fine positions (4N), C latent channels,
D DiT width, R RefineNet width, H heads, E head width, G grid side (h = w).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from raygen.models.ar import ARConfig, ARModel
from raygen.models.base import FamilySpec, GenerativeModel, ModelConfig
from raygen.models.diffusion import Denoiser, Guidance, Schedule, ddim_sample, ddpm_sample, diffusion_loss
from raygen.models.diffusion.guidance import GUIDANCE_SCHEDULES
from raygen.models.diffusion.schedule import BETA_SCHEDULES

# [I] DiT's blocks reuse eMIGM's timm-named attention and MAR/DiT timestep embedder: now that two
# families use them they are candidates for layers.py.
from raygen.models.layers import LabelEmbedder, TimestepEmbedder, ViTAttention, modulate
from raygen.models.sampling import SamplingOptions, sampling_entry

SAMPLERS = ("ddpm", "ddim")
DEFAULT_STEPS = 250  # DiT's sampling steps (respaced DDPM)


# --- fixed 2-D sin-cos positions (DiT's table) --------------------------------------------------


def sincos_2d(grid: int, dim: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """DiT's 2-D sin-cos table (grid*grid, dim) float32 in raster order.

    The first dim/2 channels encode the COLUMN, the last dim/2 the ROW (DiT's meshgrid(w, h)
    order); each half is [sin | cos] of position * 10000^(-i / (dim/4)), i < dim/4.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos table needs dim % 4 == 0, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)  # (dim/4,)
    pos = torch.arange(grid, dtype=torch.float32, device=device)  # (G,)
    ang = torch.outer(pos, omega)  # (G, dim/4)
    one_d = torch.cat([ang.sin(), ang.cos()], dim=-1)  # (G, dim/2)
    cols = repeat(one_d, "w e -> (h w) e", h=grid)  # (G*G, dim/2)
    rows = repeat(one_d, "h e -> (h w) e", w=grid)  # (G*G, dim/2)
    return torch.cat([cols, rows], dim=-1)  # (G*G, dim)


def upsample_cells(x: torch.Tensor, grid: int) -> torch.Tensor:
    """Nearest 2x upsampling of per-cell values (B, N, K) -> fine raster order (B, 4N, K)."""
    return repeat(x, "b (h w) k -> b (h a w s) k", h=grid, a=2, s=2)


def cells_to_fine(fine_mask: torch.Tensor, grid: int) -> torch.Tensor:
    """A per-cell mask (B, N) -> the mask of its fine positions (B, 4N)."""
    return repeat(fine_mask, "b (h w) -> b (h a w s)", h=grid, a=2, s=2)


# --- blocks (DiT's layout) ---------------------------------------------------------------------


class DiTBlock(nn.Module):
    """DiT's adaLN-Zero block at width `dim`, modulated by a condition of width `cond_dim`."""

    def __init__(self, dim: int, n_head: int, *, mlp_ratio: float = 4.0, cond_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = ViTAttention(dim, n_head, attn_dropout=0.0, proj_dropout=0.0)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, hidden), "fc2": nn.Linear(hidden, dim)})
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mods = rearrange(self.adaLN_modulation(c), "b (six d) -> six b 1 d", six=6)  # (6, B, 1, D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a))  # (B, L, D)
        h = F.gelu(self.mlp["fc1"](modulate(self.norm2(x), shift_m, scale_m)), approximate="tanh")  # (B, L, 4D)
        return x + gate_m * self.mlp["fc2"](h)  # (B, L, D)


class FinalLayer(nn.Module):
    """DiT's final layer: adaLN (shift, scale) from the condition, LayerNorm, Linear -> out channels."""

    def __init__(self, dim: int, out_channels: int, *, cond_dim: int | None = None):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = rearrange(self.adaLN_modulation(c), "b (two d) -> two b 1 d", two=2)  # (B, 1, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, L, out)


class RefineNet(nn.Module):
    """DiT output tokens (B, N, D) + noisy fine latents -> a [eps, v] correction per fine position (B, F, 2C)."""

    def __init__(self, *, dim: int, width: int, depth: int, n_head: int, grid: int, channels: int,
                 out_channels: int, mlp_ratio: float):
        super().__init__()
        self.grid = grid
        self.in_proj = nn.Linear(dim, width)
        self.sub_pos = nn.Parameter(torch.zeros(4, width))  # [P] learnable; the 2x2 sub-positions
        self.pos_embed = nn.Parameter(torch.zeros(4 * grid * grid, width))  # [P] learnable; the fine grid
        self.fine_proj = nn.Linear(channels, width)
        self.blocks = nn.ModuleList(DiTBlock(width, n_head, mlp_ratio=mlp_ratio, cond_dim=dim) for _ in range(depth))
        self.final_layer = FinalLayer(width, out_channels, cond_dim=dim)

    def forward(self, h: torch.Tensor, xf_t: torch.Tensor, fine: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """h (B, N, D), xf_t (B, F, C), fine (B, F) bool (the position's cell is fine), c (B, D) -> (B, F, 2C)."""
        z = upsample_cells(self.in_proj(h), self.grid)  # (B, F, R): each cell's token at its 4 sub-positions
        sub = repeat(self.sub_pos, "(a s) r -> (h a w s) r", a=2, s=2, h=self.grid, w=self.grid)  # (F, R)
        z = z + (sub + self.pos_embed).to(z.dtype)  # (B, F, R)
        own = self.fine_proj(xf_t)  # (B, F, R)
        z = z + torch.where(fine[..., None], own, torch.zeros_like(own))  # coarse cells: no fine latent
        for block in self.blocks:
            z = block(z, c)  # (B, F, R)
        return self.final_layer(z, c)  # (B, F, 2C)


# --- config and sizes ------------------------------------------------------------------------------


@dataclasses.dataclass
class D2iTConfig(ModelConfig):
    """D2iT's Dynamic Content Transformer (defaults: D2iT-XL at 256 px, C = 4, f = 16 coarse grid)."""

    vocab_size: int = 1  # unused: the data are continuous latents
    grid_size: int = 16  # h = w, coarse cells per side (f = 16 at 256 px); the fine grid is 2h x 2w
    token_dim: int = 4  # C, latent channels of both grains (SD-VAE-like, DiT's comparison)
    dim: int = 1152  # D, DiT width
    depth: int = 28  # DiT blocks
    n_head: int = 16
    mlp_ratio: float = 4.0
    refine_depth: int = 2  # RefineNet blocks [P: 2 is best for B]
    refine_dim: int | None = None  # R; None = dim // 2 [I]
    refine_heads: int | None = None  # None = n_head // 2 (keeps DiT's head width at R = D / 2) [I]
    class_dropout: float = 0.1  # CFG label dropout (DiT)
    learn_sigma: bool = True  # 2C outputs [eps, v], IDDPM's hybrid loss (DiT)
    diffusion_steps: int = 1000  # T
    noise_schedule: str = "linear"  # DiT's betas
    fine_loss_weight: float = 1.0  # weight of the fine-grain mean in the dynamic grain loss [I]
    grain_dim: int = 256  # the Dynamic Grain Transformer (LlamaGen AR over the grain map, vocab 2) [I]
    grain_depth: int = 4
    grain_heads: int = 4
    grain_loss_weight: float = 1.0  # its cross-entropy's weight in the joint loss [I]

    def __post_init__(self) -> None:
        super().__post_init__()
        small = [f for f in ("token_dim", "dim", "depth", "n_head", "diffusion_steps") if getattr(self, f) < 1]
        bad = (small or self.refine_depth < 0 or self.dim % self.n_head or self.refine_width % self.refine_n_head
               or self.dim % 4 or self.refine_width % 4 or self.refine_width < 1 or not 0 <= self.class_dropout < 1
               or self.fine_loss_weight < 0 or self.grain_loss_weight < 0 or self.noise_schedule not in BETA_SCHEDULES)
        if bad:
            raise ValueError(f"D2iTConfig: need {', '.join(small) or 'sizes'} >= 1, refine_depth >= 0, "
                             f"dim % n_head == 0, dim and refine width % 4 == 0, refine width % refine heads == 0, "
                             f"0 <= class_dropout < 1, fine_loss_weight >= 0, noise_schedule in "
                             f"{sorted(BETA_SCHEDULES)}; got {self}")

    @property
    def refine_width(self) -> int:
        """R: refine_dim, or dim // 2."""
        return self.refine_dim if self.refine_dim is not None else self.dim // 2

    @property
    def refine_n_head(self) -> int:
        return self.refine_heads if self.refine_heads is not None else max(1, self.n_head // 2)

    @property
    def n_layer(self) -> int:
        """DiT + RefineNet blocks (the paper's "total layers")."""
        return self.depth + self.refine_depth

    @property
    def out_channels(self) -> int:
        return 2 * self.token_dim if self.learn_sigma else self.token_dim

    def grain_config(self) -> ARConfig:
        """The Dynamic Grain Transformer's config: raster AR over the (h, w) grain map, ids 0/1."""
        return ARConfig(vocab_size=2, grid_size=self.grid_size, num_classes=self.num_classes, dim=self.grain_dim,
                        n_layer=self.grain_depth, n_head=self.grain_heads, class_dropout=self.class_dropout)


# Counts at grid 16, C = 4, 1000 classes, the DCT's (paper: L 467M, XL 687M); the DGT adds 3.7M [I].
D2IT_SIZES: dict[str, D2iTConfig] = {
    "debug": D2iTConfig(dim=64, depth=2, n_head=4, refine_depth=1, grain_dim=64, grain_depth=2),  # R 32, 2 heads
    "B": D2iTConfig(dim=768, depth=10, n_head=12, refine_depth=2),  # 10 DiT + 2 RefineNet [P]; 117.4M
    "L": D2iTConfig(dim=1024, depth=24, n_head=16, refine_depth=2),  # R 512, 8 heads; 472.5M, +1.2% (DiT-L/2 458.1M)
    "XL": D2iTConfig(dim=1152, depth=28, n_head=16, refine_depth=2),  # R 576, 8 heads; 693.3M, +0.9% (DiT-XL/2 675.1M)
}


# --- the model ---------------------------------------------------------------------------------------


class ContentTransformer(GenerativeModel):
    """D2iT's Dynamic Content Transformer: multi-grained latents + grain map -> coarse and fine [eps, v]."""

    standalone = False  # generate needs a grain map (the paper's Dynamic Grain Transformer makes one)

    def __init__(self, config: D2iTConfig):
        super().__init__()
        self.config = c = config
        self.coarse_embedder = nn.Linear(c.token_dim, c.dim)  # routing: a coarse cell's latent
        self.fine_embedder = nn.Linear(4 * c.token_dim, c.dim)  # routing: a fine cell's 2x2 latents
        self.grain_embedder = nn.Embedding(2, c.dim)
        self.t_embedder = TimestepEmbedder(c.dim)
        self.y_embedder = LabelEmbedder(c.num_classes, c.dim, c.class_dropout)
        self.blocks = nn.ModuleList(DiTBlock(c.dim, c.n_head, mlp_ratio=c.mlp_ratio) for _ in range(c.depth))
        self.final_layer = FinalLayer(c.dim, c.out_channels)
        self.refine = RefineNet(dim=c.dim, width=c.refine_width, depth=c.refine_depth, n_head=c.refine_n_head,
                                grid=c.grid_size, channels=c.token_dim, out_channels=c.out_channels,
                                mlp_ratio=c.mlp_ratio)
        with torch.device("cpu"):  # float64 tables on the CPU, not parameters (even under a meta device)
            self.schedule = Schedule.named(c.noise_schedule, c.diffusion_steps)
        self._respaced: dict[int, Schedule] = {}
        self.last_sampling: dict[str, int] = {}  # nfe and B-sized passes of the last generate()
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier-uniform Linear, zero biases, N(0, .02) label table and time MLP, zero adaLN
        gates and output layers (adaLN-Zero). [I] grain and sub-position embeddings N(0, .02); the
        fine-grid position embedding starts as the fine grid's sin-cos table."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.grain_embedder.weight, std=0.02)
        nn.init.normal_(self.refine.sub_pos, std=0.02)
        for lin in self.t_embedder.mlp[0], self.t_embedder.mlp[2]:
            nn.init.normal_(lin.weight, std=0.02)
        r = self.refine
        with torch.no_grad():
            r.pos_embed.copy_(sincos_2d(2 * self.config.grid_size, r.pos_embed.shape[1], device=r.pos_embed.device))
        zero = [b.adaLN_modulation[-1] for b in [*self.blocks, *r.blocks]]
        zero += [f.adaLN_modulation[-1] for f in (self.final_layer, r.final_layer)]
        zero += [self.final_layer.linear, r.final_layer.linear]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # --- the network -----------------------------------------------------------------------------
    def route_in(self, xc_t: torch.Tensor, xf_t: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        """The routing module: xc_t (B, N, C), xf_t (B, F, C) fine raster, fine (B, N) bool -> tokens (B, N, D).

        A coarse cell's token reads only its coarse latent, a fine cell's only its 2x2 fine latents.
        """
        g = self.config.grid_size
        cells = rearrange(xf_t, "b (h a w s) c -> b (h w) (a s c)", h=g, a=2, s=2)  # (B, N, 4C)
        tok = torch.where(fine[..., None], self.fine_embedder(cells), self.coarse_embedder(xc_t))  # (B, N, D)
        pos = sincos_2d(g, self.config.dim, device=tok.device).to(tok.dtype)  # (N, D), fixed [I: DiT's]
        return tok + self.grain_embedder(fine.long()) + pos  # (B, N, D)

    def predict(self, xc_t: torch.Tensor, xf_t: torch.Tensor, fine: torch.Tensor, t: torch.Tensor,
                y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy xc_t (B, N, C), xf_t (B, F, C), fine (B, N) bool, step labels t (B,), class ids y (B,)
        (the null id = unconditional) -> float32 coarse (B, N, 2C) and fine (B, F, 2C) [eps, v].

        The fine prediction is nearest-upsample(coarse) + the RefineNet correction.
        """
        g = self.config.grid_size
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)  # (B, D)
        h = self.route_in(xc_t, xf_t, fine)  # (B, N, D)
        for block in self.blocks:
            h = block(h, c)  # (B, N, D)
        coarse = self.final_layer(h, c).float()  # (B, N, 2C)
        correction = self.refine(h, xf_t, cells_to_fine(fine, g), c).float()  # (B, F, 2C)
        return coarse, upsample_cells(coarse, g) + correction  # (B, N, 2C), (B, F, 2C)

    # --- inputs ------------------------------------------------------------------------------------
    def check_grain(self, grain: torch.Tensor) -> torch.Tensor:
        """A grain map (B, N) or (B, h, w) of 0 (coarse) / 1 (fine) -> bool (B, N) on the model's device."""
        n = self.config.seq_len
        grain = torch.as_tensor(grain, device=self.device)
        if grain.ndim == 3:
            grain = rearrange(grain, "b h w -> b (h w)")  # (B, N)
        if grain.ndim != 2 or grain.shape[1] != n:
            raise ValueError(f"expected a grain map (B, {n}) or (B, {self.config.grid_size}, "
                             f"{self.config.grid_size}), got {tuple(grain.shape)}")
        if ((grain != 0) & (grain != 1)).any():
            raise ValueError("grain map values must be 0 (coarse) or 1 (fine)")
        return grain.bool()

    def check_latents(self, latents: torch.Tensor, fine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coarse (B, N, C) and fine (B, 4N, C) latents -> float32; another shape raises."""
        c = self.config
        want = {"latents": (c.seq_len, c.token_dim), "fine": (4 * c.seq_len, c.token_dim)}
        for name, x in (("latents", latents), ("fine", fine)):
            if x.ndim != 3 or tuple(x.shape[1:]) != want[name]:
                raise ValueError(f"expected {name} (B, {want[name][0]}, {want[name][1]}), got {tuple(x.shape)}")
        return latents.float(), fine.float()

    # --- training ----------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor], *,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """batch {"latents": (B, N, C), "fine": (B, F, C), "grain": (B, N), "label": (B,)}
        -> {"loss", "loss_coarse", "loss_fine", "fine_frac"}.

        Draws from `generator`, in order: steps k (B,), eps_c (B, N, C), eps_f (B, F, C), then the
        label dropout (B,) when training with class_dropout > 0.
        """
        c = self.config
        x_c, x_f = self.check_latents(batch["latents"], batch["fine"])  # (B, N, C), (B, F, C)
        fine = self.check_grain(batch["grain"])  # (B, N)
        labels = batch["label"].long().reshape(-1)  # (B,)
        k = self.schedule.sample_steps(len(x_c), generator=generator, device=x_c.device)  # (B,)
        eps_c = torch.randn(x_c.shape, generator=generator, device=x_c.device)  # (B, N, C)
        eps_f = torch.randn(x_f.shape, generator=generator, device=x_f.device)  # (B, F, C)
        xc_t, xf_t = self.schedule.q_sample(x_c, k, eps_c), self.schedule.q_sample(x_f, k, eps_f)  # one k per image
        drop = self.training and c.class_dropout > 0
        y = self.y_embedder.token_drop(labels, generator) if drop else labels  # (B,), null id where dropped
        out_c, out_f = self.predict(xc_t, xf_t, fine, k, y)  # (B, N, 2C), (B, F, 2C)
        loss_c = self._grain_loss(out_c, x_c, xc_t, eps_c, k, ~fine)  # coarse cells
        loss_f = self._grain_loss(out_f, x_f, xf_t, eps_f, k, cells_to_fine(fine, c.grid_size))  # fine positions
        return {"loss": loss_c + c.fine_loss_weight * loss_f, "loss_coarse": loss_c.detach(),
                "loss_fine": loss_f.detach(), "fine_frac": fine.float().mean()}

    def _grain_loss(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor,
                    k: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Hybrid loss of out (B, L, 2C) vs noise (B, L, C), mean over the kept positions keep (B, L); 0 if none."""
        per = lambda t: rearrange(t, "b l c -> b c l")  # noqa: E731 - the diffusion package's channel axis
        terms = diffusion_loss(self.schedule, per(out), x0=per(x0), x_t=per(x_t), k=k, noise=per(noise))
        loss = rearrange(terms["loss"], "b c l -> b l c")  # (B, L, C)
        kept = torch.where(keep[..., None], loss, torch.zeros_like(loss))  # exact zeros off the grain
        return kept.sum() / (keep.sum() * loss.shape[-1]).clamp(min=1)

    def flops_per_sample(self) -> float:
        """6 P L + 12 depth width L^2 for the DiT (L = N) and the RefineNet (L = 4N); embeddings are cheap."""
        c = self.config
        count = lambda *mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
        n, f = c.seq_len, 4 * c.seq_len
        dit = 6 * count(self.blocks, self.final_layer) * n + 12 * c.depth * c.dim * n**2
        ref = 6 * count(self.refine.blocks, self.refine.final_layer) * f + 12 * c.refine_depth * c.refine_width * f**2
        return float(dit + ref)

    # --- sampling ----------------------------------------------------------------------------------
    def denoiser(self, labels: torch.Tensor, fine: torch.Tensor, guidance: Guidance) -> Denoiser:
        """The samplers' view: the state (B, C, N + F) = [coarse | fine] on the last axis, the condition
        (B, 1 + N) = [class id | grain map], the unconditional one with the null class."""
        c = self.config
        n = c.seq_len
        cond = torch.cat([labels[:, None], fine.long()], dim=1)  # (B, 1 + N)
        uncond = torch.cat([torch.full_like(labels[:, None], self.y_embedder.null_id), fine.long()], dim=1)

        def net(x: torch.Tensor, t: torch.Tensor, cnd: torch.Tensor) -> torch.Tensor:
            xc = rearrange(x[..., :n], "b c l -> b l c")  # (B', N, C)
            xf = rearrange(x[..., n:], "b c l -> b l c")  # (B', F, C)
            out_c, out_f = self.predict(xc, xf, cnd[:, 1:].bool(), t, cnd[:, 0])
            return rearrange(torch.cat([out_c, out_f], dim=1), "b l c -> b c l")  # (B', 2C, N + F)

        return Denoiser(net, cond=cond, uncond=uncond, guidance=guidance, learned_variance=c.learn_sigma,
                        num_train_steps=c.diffusion_steps)

    @sampling_entry
    def generate(self, labels: torch.Tensor, opts: SamplingOptions, *, grain: torch.Tensor | None = None,
                 sampler: str = "ddpm", eta: float = 0.0, cfg_schedule: str = "constant") -> dict[str, torch.Tensor]:
        """labels (B,), grain (B, h, w) or (B, N) 0/1 -> {"latents": (B, N, C), "fine": (B, F, C), "grain": (B, N)}.

        The training batch's layout, float32; values of the unrepresented grain are zero.
        `steps` (default 250) respaced steps of `sampler` ("ddpm": ancestral with learned variance,
        noise x temperature; "ddim": eta, no temperature). CFG: cfg_scale w with the named
        `cfg_schedule` on every eps channel of both grains. top_k / top_p (token ids) raise.
        Sets `last_sampling` {"nfe", "passes"}.
        """
        c, generator = self.config, opts.generator
        steps = DEFAULT_STEPS if opts.steps is None else opts.steps
        if grain is None:
            raise ValueError("D2iT samples content for a given grain map: pass grain= (B, h, w), 0 coarse / 1 fine")
        if sampler not in SAMPLERS or cfg_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"need sampler in {SAMPLERS} and cfg_schedule in {GUIDANCE_SCHEDULES}, "
                             f"got {sampler!r}, {cfg_schedule!r}")
        if opts.top_k != 0 or opts.top_p != 1.0:
            raise ValueError("top_k and top_p filter token ids; D2iT's latents are continuous (leave them at 0 / 1)")
        if sampler == "ddim" and opts.temperature != 1.0:
            raise ValueError("temperature applies to sampler='ddpm' only")
        if not 1 <= steps <= c.diffusion_steps:
            raise ValueError(f"steps must lie in [1, {c.diffusion_steps}], got {steps}")
        self.check_generator(generator)
        with self.evaluating():
            labels = self.check_labels(labels)  # (B,)
            fine = self.check_grain(grain)  # (B, N)
            if len(fine) != len(labels):
                raise ValueError(f"{len(labels)} labels but {len(fine)} grain maps")
            if steps not in self._respaced:
                self._respaced[steps] = self.schedule.respace(str(steps))
            sched, b, n = self._respaced[steps], len(labels), c.seq_len
            den = self.denoiser(labels, fine, Guidance(opts.cfg_scale, schedule=cfg_schedule))
            x_T = torch.randn(b, c.token_dim, 5 * n, generator=generator, device=labels.device)  # (B, C, N + F)
            if sampler == "ddpm":
                out = ddpm_sample(sched, den, x_T, temperature=opts.temperature, generator=generator)
            else:
                out = ddim_sample(sched, den, x_T, eta=eta, generator=generator)
            self.last_sampling = {"nfe": out.nfe, "passes": out.passes}
            coarse = rearrange(out.x[..., :n], "b c l -> b l c")  # (B, N, C)
            fine_lat = rearrange(out.x[..., n:], "b c l -> b l c")  # (B, F, C)
            coarse = torch.where(fine[..., None], torch.zeros_like(coarse), coarse)
            fine_lat = torch.where(cells_to_fine(fine, c.grid_size)[..., None], fine_lat, torch.zeros_like(fine_lat))
            return {"latents": coarse.float(), "fine": fine_lat.float(), "grain": fine.to(torch.uint8)}


GRAIN_SOURCES = ("predicted", "random")


class D2iT(GenerativeModel):
    """D2iT's two transformers as one model: the DGT (`dgt`, grain maps from classes) and the DCT (`dct`).

    [I] The paper trains them as two stages; here they train in one run on the same rows (the grain
    map is a side column of the DVAE's data set), their losses summed (disjoint parameters: each
    gets exactly its own gradient; they share the optimizer's settings and the step count). The DGT
    is raygen's `ar` model (LlamaGen's raster AR) with a vocabulary of 2 on the coarse grid: a
    class-conditional discrete model of an h x w map is exactly what it is.
    """

    def __init__(self, config: D2iTConfig):
        super().__init__()
        self.config = config
        self.dct = ContentTransformer(config)
        self.dgt = ARModel(config.grain_config())
        self.last_sampling: dict[str, int] = {}  # the DCT's nfe and passes, and the DGT's passes

    @property
    def grid(self) -> int:
        return self.config.grid_size

    def forward(self, batch: dict[str, torch.Tensor], *,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """batch {"latents", "fine", "grain", "label"} (ContentTransformer.forward's) -> the summed loss,
        the DCT's terms, and the DGT's grain_loss / grain_acc. Draws the DCT's randomness first."""
        out = self.dct(batch, generator=generator)
        grain = rearrange(batch["grain"].long(), "b ... -> b (...)")  # (B, N)
        g = self.dgt({"tokens": grain, "label": batch["label"]}, generator=generator)
        return {**out, "loss": out["loss"] + self.config.grain_loss_weight * g["loss"],
                "grain_loss": g["loss"].detach(), "grain_acc": g["acc"]}

    def flops_per_sample(self) -> float:
        return self.dct.flops_per_sample() + self.dgt.flops_per_sample()

    def sample_grain(self, labels: torch.Tensor, *, source: str = "predicted", cfg_scale: float = 1.0,
                     temperature: float = 1.0, fine_ratio: float = 0.5,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """labels (B,) -> grain maps (B, h, w) int64: predicted by the DGT (its own CFG and temperature)
        or random (each cell fine with probability fine_ratio, from `generator`)."""
        if source not in GRAIN_SOURCES:
            raise ValueError(f"grain source must be one of {GRAIN_SOURCES} (or pass grain=), got {source!r}")
        if source == "random":
            g = self.grid
            return (torch.rand(len(labels), g, g, generator=generator, device=labels.device) < fine_ratio).long()
        return self.dgt.generate(labels, cfg_scale=cfg_scale, temperature=temperature, generator=generator)

    @sampling_entry
    def generate(self, labels: torch.Tensor, opts: SamplingOptions, *, grain: torch.Tensor | None = None,
                 grain_source: str = "predicted", grain_cfg_scale: float = 1.0, grain_temperature: float = 1.0,
                 random_fine_ratio: float = 0.5, sampler: str = "ddpm", eta: float = 0.0,
                 cfg_schedule: str = "constant") -> dict[str, torch.Tensor]:
        """labels (B,) -> {"latents", "fine", "grain"} (ContentTransformer.generate's): the grain map is
        `grain` when given (B, h, w), else drawn by `sample_grain` from the same generator first; then
        the DCT samples the content with the common options (cfg_scale, steps, temperature)."""
        labels = self.check_labels(labels)
        predicted = grain is None and grain_source == "predicted"
        if grain is None:
            grain = self.sample_grain(labels, source=grain_source, cfg_scale=grain_cfg_scale,
                                      temperature=grain_temperature, fine_ratio=random_fine_ratio,
                                      generator=opts.generator)
        out = self.dct.generate(labels, grain=grain, sampler=sampler, eta=eta, cfg_schedule=cfg_schedule,
                                **opts.kwargs())
        self.last_sampling = {**self.dct.last_sampling, "grain_passes": self.grid**2 if predicted else 0}
        return out


D2IT_FAMILY = FamilySpec(family="d2it", model_cls=D2iT, config_cls=D2iTConfig, sizes=D2IT_SIZES)

# DiT's own counts (facebookresearch/DiT, 256 px, 32x32 latents, patch 2, C = 4, 1000 classes, pos_embed
# counted as DiT's frozen Parameter), for comparison: DiT-L/2 458,102,816; DiT-XL/2 675,129,632.
DIT_PARAMS = {"L": 458_102_816, "XL": 675_129_632}
