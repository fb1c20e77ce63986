"""D2iT's Dynamic VAE (DVAE): one image, two grains of KL latents, merged back through a grain map.

D2iT (arXiv 2504.09454) encodes detailed regions finely and flat ones coarsely. The paper names a
hierarchical encoder and a decoder that merges the grains; the layout below follows the same
group's DQ-VAE (F16 features nearest-upsampled 2x and merged with F8 features through the grain
gate), on raygen's KL-VAE blocks (raygen/models/tokenizers/kl.py). [P] = the paper states it,
[I] = raygen's choice.

The network (`DynamicAutoencoder`, in raygen/models/tokenizers/dvae.py beside the codec that uses it):

Encoder [I: DQ-VAE's layout]. KLEncoder's levels down to the FINE factor f (ch_mult sets it, as
for the KL-VAE); its output gives the fine posterior (B, 2E, H/f, W/f) through `quant_conv`. A
coarse branch continues from the same features: Downsample -> ResnetBlock -> GroupNorm, swish,
conv -> `coarse_quant_conv` -> the coarse posterior (B, 2E, H/2f, W/2f).

Decoder [I]. The fine latent through `post_quant_conv` and the decoder's `conv_in` gives features
at the fine grid; the coarse latent through `coarse_post_quant_conv`, `coarse_in`, a ResnetBlock and
an Upsample (nearest 2x + conv) gives features at the same grid. The merge keeps the fine features
in fine cells and the upsampled coarse ones in coarse cells (the grain map, nearest-upsampled to the
fine grid); the rest is KLDecoder's middle and levels. A coarse cell's fine latents and a fine
cell's coarse latent never reach the image.

Training [I]. The loss is the KL-VAE's (L1 or L2 + kl_weight x KL + LPIPS + a critic, see
raygen/models/klvae.py) with KL summed over both grains' full grids. Each image is decoded through
a grain map drawn per cell, fine with probability `fine_ratio`, so the decoder learns every
mixture and the seams between grains (the entropy map picks the grains only when a data set is
tokenized; a DGT-predicted or random map must decode too). Reconstructions shown during training
and by `reconstruct` use the entropy grain map with the batch's own (1 - fine_ratio) quantile.

Axis letters: B batch, C image channels, E latent channels, h/w coarse grid side, H/W image side.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raygen.models.base import FamilySpec
from raygen.models.grain import entropy_threshold, grain_map, region_entropy
from raygen.models.klvae import KLVAE, KLVAEConfig
from raygen.models.tokenizers.dvae import DVAE_ARCHS, DynamicAutoencoder, check_arch
from raygen.models.tokenizers.kl import KLConfig


@dataclass
class DVAEConfig(KLVAEConfig):
    """KLConfig's fields set the FINE grain (f = 2**(len(ch_mult) - 1)); the coarse grain is 2f."""

    fine_ratio: float = 0.5  # training grain maps: P(cell is fine); reconstructions: the entropy quantile

    def __post_init__(self) -> None:
        super().__post_init__()
        check_arch(self)
        if not 0.0 <= self.fine_ratio <= 1.0:
            raise ValueError(f"DVAEConfig.fine_ratio must lie in [0, 1], got {self.fine_ratio}")

    @property
    def coarse_downsample(self) -> int:
        """Pixels per coarse latent along each side (2f): the grain map's region side."""
        return 2 * self.downsample


class DVAE(KLVAE):
    """The Dynamic VAE and the KL-VAE's objective; forward({"images": (B, H, W, C) uint8}) -> losses."""

    def __init__(self, config: DVAEConfig):
        nn.Module.__init__(self)
        self.config = config
        self.autoencoder = DynamicAutoencoder(config.autoencoder())
        self.autoencoder.initialize_weights(config.seed)
        self.__dict__["perceptual"] = None

    def grain_shape(self, x: torch.Tensor) -> tuple[int, int, int]:
        s = self.config.coarse_downsample
        return (x.shape[0], x.shape[2] // s, x.shape[3] // s)

    def autoencode(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws from `generator`: the grain map (B, h, w), then the coarse and the fine posterior samples."""
        c = self.config
        fine = torch.rand(self.grain_shape(x), generator=generator, device=x.device) < c.fine_ratio  # (B, h, w)
        post_c, post_f = self.autoencoder.encode(x)
        z_c = post_c.sample(generator) if c.sample_posterior else post_c.mode()  # (B, E, h, w)
        z_f = post_f.sample(generator) if c.sample_posterior else post_f.mode()  # (B, E, 2h, 2w)
        return self.autoencoder.decode(z_c, z_f, fine).float(), post_c.kl() + post_f.kl()

    def entropy_grain(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [-1, 1] -> the entropy grain map (B, h, w) bool at the batch's own quantile."""
        u = torch.round((x.clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
        ent = region_entropy(u.permute(0, 2, 3, 1).cpu(), self.config.coarse_downsample)  # (B, h, w)
        return grain_map(ent, entropy_threshold(ent, self.config.fine_ratio)).bool().to(x.device)

    def decode_mean(self, x: torch.Tensor) -> torch.Tensor:
        post_c, post_f = self.autoencoder.encode(x)
        return self.autoencoder.decode(post_c.mode(), post_f.mode(), self.entropy_grain(x))

    def latent_means(self, x: torch.Tensor) -> torch.Tensor:
        """Both grains' posterior means, flattened together (one latent scale for both grains [I])."""
        post_c, post_f = self.autoencoder.encode(x)
        return torch.cat([post_c.mode().flatten(), post_f.mode().flatten()])

    def flops_per_sample(self) -> float:
        """Forward + backward FLOPs of the autoencoder on one image (3x a meta-device forward)."""
        from torch.utils.flop_counter import FlopCounterMode

        cfg = self.config.autoencoder()
        with torch.device("meta"):
            ae = DynamicAutoencoder(cfg)
            x = torch.empty(1, cfg.image_channels, cfg.image_size, cfg.image_size)
            s = cfg.image_size // (2 * cfg.downsample)
            fine = torch.zeros(1, s, s, dtype=torch.bool)
        with FlopCounterMode(display=False) as counter:
            post_c, post_f = ae.encode(x)
            ae.decode(post_c.mode(), post_f.mode(), fine)
        return 3.0 * counter.get_total_flops()


def _size(base: KLConfig, **objective: Any) -> DVAEConfig:
    return DVAEConfig(**dataclasses.asdict(base), **objective)


DVAE_SIZES: dict[str, DVAEConfig] = {  # the architectures of raygen/models/tokenizers/dvae.py
    "debug": _size(DVAE_ARCHS["debug"], disc_weight=0.0),  # digits: no critic (a CPU preset)
    "photos": _size(DVAE_ARCHS["photos"]),
    "f16": _size(DVAE_ARCHS["f16"]),
}

DVAE_FAMILY = FamilySpec("dvae", DVAE, DVAEConfig, DVAE_SIZES)

__all__ = ["DVAE", "DVAEConfig", "DVAE_SIZES", "DVAE_FAMILY", "DynamicAutoencoder"]
