"""The `dvae` codec: images <-> D2iT's two grains of latents and the entropy grain map.

A data set tokenized with it has the coarse latents as its data column (`latents`, (h*w, E)) and
two side columns: `fine`, the fine latents ((2h)*(2w), E, raster order on the fine grid) and
`grain`, the grain map (h*w uint8, 1 = fine). Both grains are stored whole (posterior means x the
codec's scale); the grain map says which one represents each coarse cell.

The grain map is the entropy rule of raygen/models/grain.py over coarse regions (2f x 2f pixels).
Its threshold is fitted once, when the codec is built for a data set: the (1 - fine_ratio)
quantile of the region entropies of `fit_images` source images drawn with `seed`, so a fraction
r_f = fine_ratio of the regions is fine. The threshold and r_f are the codec's fitted state: they
go into the manifest's spec and fingerprint, and every worker applies the same threshold.

The weights come from a raygen `dvae` training run (its export directory, or models:/NAME@ALIAS
resolved by `raygen tokenize`); there are no published DVAE weights. Without a checkpoint the
weights are random from `seed` (tests, and measuring the grain maps alone).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange

from einops import repeat
from torch import nn

from raygen.models.grain import entropy_threshold, grain_map, region_entropy
from raygen.models.tokenizers.base import LatentCodec
from raygen.models.tokenizers.kl import (
    DiagonalGaussian,
    KLConfig,
    KLDecoder,
    KLEncoder,
    check_kl_state_dict,
    is_export,
    load_kl_state_dict,
)
from raygen.models.tokenizers.vq import Downsample, ResnetBlock, Upsample, _init_weights, _norm, _swish

FAMILY = "dvae"  # the training family whose exports hold these weights


# --- the network (the training objective: raygen/models/dvae.py) ----------------------------------


def check_arch(config: KLConfig) -> KLConfig:
    """A KLConfig as a DVAE architecture: its ch_mult sets the FINE factor f, the coarse one is 2f."""
    if config.image_size % (2 * config.downsample):
        raise ValueError(f"a DVAE on {config.image_size} px images needs a multiple of the coarse factor "
                         f"{2 * config.downsample}")
    return config


DVAE_ARCHS: dict[str, KLConfig] = {
    # digits: 16 px grayscale; fine f=2 (8x8), coarse f=4 (4x4) of 4 channels
    "debug": KLConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, image_size=16,
                      image_channels=1, encoder_attn_resolutions=(8,), scale=1.0),
    # RGB photographs at 64 px: fine f=4 (16x16), coarse f=8 (8x8) of 8 channels
    "photos": KLConfig(ch=64, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=8, embed_dim=8, image_size=64,
                       image_channels=3, encoder_attn_resolutions=(16,), scale=1.0),
    # [I] D2iT's guess at 256 px: fine F8 (32x32), coarse F16 (16x16), 4 channels (DiT's C)
    "f16": KLConfig(ch=128, ch_mult=(1, 1, 2, 4), num_res_blocks=2, z_channels=4, embed_dim=4, image_size=256,
                    image_channels=3, encoder_attn_resolutions=(32,), scale=1.0),
}


class DVAEEncoder(KLEncoder):
    """(B, C, H, W) -> (coarse moments (B, 2z, H/2f, W/2f), fine moments (B, 2z, H/f, W/f))."""

    def __init__(self, cfg: KLConfig):
        super().__init__(cfg)
        width = cfg.ch * cfg.ch_mult[-1]
        self.coarse_down = Downsample(width)
        self.coarse_block = ResnetBlock(width, width)
        self.coarse_norm = _norm(width)
        self.coarse_out = nn.Conv2d(width, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        h = self.features(x)  # (B, width, 2h, 2w)
        fine = self.conv_out(_swish(self.norm_out(h)))  # (B, 2z, 2h, 2w)
        c = self.coarse_block(self.coarse_down(h))  # (B, width, h, w)
        return self.coarse_out(_swish(self.coarse_norm(c))), fine


class DVAEDecoder(KLDecoder):
    """(z_c (B, z, h, w), z_f (B, z, 2h, 2w), fine (B, h, w) bool) -> (B, C, H, W)."""

    def __init__(self, cfg: KLConfig):
        super().__init__(cfg)
        width = cfg.ch * cfg.ch_mult[-1]
        self.coarse_in = nn.Conv2d(cfg.z_channels, width, 3, padding=1)
        self.coarse_block = ResnetBlock(width, width)
        self.coarse_up = Upsample(width)

    def forward(self, z_c: torch.Tensor, z_f: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        coarse = self.coarse_up(self.coarse_block(self.coarse_in(z_c)))  # (B, width, 2h, 2w)
        gate = repeat(fine, "b h w -> b 1 (h a) (w s)", a=2, s=2)  # (B, 1, 2h, 2w)
        return self.from_features(torch.where(gate, self.conv_in(z_f), coarse))  # (B, C, H, W)


class DynamicAutoencoder(nn.Module):
    """encode -> two posteriors (coarse, fine); decode(z_c, z_f, grain) -> images."""

    def __init__(self, config: KLConfig):
        super().__init__()
        self.config = config
        self.encoder = DVAEEncoder(config)
        self.decoder = DVAEDecoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)  # fine
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.coarse_quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.coarse_post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def initialize_weights(self, seed: int) -> None:
        _init_weights(self, seed)

    def encode(self, x: torch.Tensor) -> tuple[DiagonalGaussian, DiagonalGaussian]:
        """(B, C, H, W) in [-1, 1] -> posteriors over coarse (B, E, h, w) and fine (B, E, 2h, 2w) latents."""
        coarse, fine = self.encoder(x)
        return DiagonalGaussian(self.coarse_quant_conv(coarse)), DiagonalGaussian(self.quant_conv(fine))

    def decode(self, z_c: torch.Tensor, z_f: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        """Unscaled z_c (B, E, h, w), z_f (B, E, 2h, 2w), grain (B, h, w) (1/True = fine) -> (B, C, H, W)."""
        return self.decoder(self.coarse_post_quant_conv(z_c), self.post_quant_conv(z_f), fine.bool())


@dataclass
class DVAECodecConfig:
    """`tokenizer.dvae`: which Dynamic VAE encodes a data set, and its grain-map fine ratio."""

    size: str = field(default="debug", metadata={
        "help": "a named architecture when there is no checkpoint: debug (16 px gray), photos (64 px), f16 (256 px)"})
    checkpoint: str | None = field(default=None, metadata={
        "help": "the weights: a raygen dvae run's export directory or models:/NAME@ALIAS (its architecture "
                "replaces `size`); null = random weights from seed", "path": True})
    fine_ratio: float = field(default=0.5, metadata={
        "help": "r_f: the fraction of coarse regions made fine (the entropy threshold is fitted for it)",
        "min": 0.0, "max": 1.0})
    fit_images: int = field(default=1024, metadata={"help": "source images the entropy threshold is fitted on",
                                                     "min": 1})
    seed: int = field(default=0, metadata={"help": "seed of the fitting sample and of random weights"})

    def __post_init__(self) -> None:
        if self.size not in DVAE_ARCHS:
            raise ValueError(f"unknown DVAE size '{self.size}'; known: {', '.join(DVAE_ARCHS)}")
        if not 0.0 <= self.fine_ratio <= 1.0:
            raise ValueError(f"fine_ratio must lie in [0, 1], got {self.fine_ratio}")


def export_config(path: str | os.PathLike[str]) -> KLConfig:
    """The architecture a `dvae` run's export directory records (its config.json)."""
    with open(os.path.join(path, "config.json")) as f:
        meta = json.load(f)
    if meta.get("family") != FAMILY:
        raise ValueError(f"{path} is an export of family {meta.get('family')!r}, not of a dvae run")
    fields = {f.name for f in dataclasses.fields(KLConfig)}
    return KLConfig(**{k: v for k, v in meta["model_config"].items() if k in fields})


def _architecture(section: DVAECodecConfig) -> KLConfig:
    if section.checkpoint is not None:
        if not is_export(section.checkpoint):
            raise ValueError(f"{section.checkpoint} is not a raygen dvae run's export directory (config.json + "
                             "model.pt); the dvae codec's weights come from `raygen train` (family dvae)")
        return export_config(section.checkpoint)
    return DVAE_ARCHS[section.size]


class DVAECodec(LatentCodec):
    """Images (B, H, W, C) uint8 <-> coarse latents (B, h*w, E) + sides {"fine": (B, 4hw, E), "grain": (B, h*w)}."""

    name = "dvae"
    config_cls = DVAECodecConfig

    def __init__(self, config: KLConfig, *, channels: int, threshold: float, fine_ratio: float,
                 checkpoint: str | os.PathLike[str] | None = None, seed: int = 0):
        if channels != config.image_channels:
            raise ValueError(f"a DVAE with image_channels={config.image_channels} cannot tokenize "
                             f"{channels}-channel images")
        super().__init__(config, image_size=config.image_size, channels=channels)
        self.threshold = float(threshold)
        self.fine_ratio = float(fine_ratio)
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.seed = seed
        self.autoencoder = DynamicAutoencoder(config)
        self.autoencoder.initialize_weights(seed)
        if self.checkpoint is not None:
            sd = load_kl_state_dict(self.checkpoint)
            check_kl_state_dict(self.autoencoder, sd, source=self.checkpoint)
            self.autoencoder.load_state_dict(sd, strict=True)
        self.eval()

    # --- building ------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> DVAECodec:
        state = spec["state"]
        return cls(KLConfig(**spec["config"]), channels=spec["channels"], threshold=state["threshold"],
                   fine_ratio=state["fine_ratio"], **spec["weights"])

    @classmethod
    def downsample_of(cls, section: DVAECodecConfig) -> int:
        return 2 * _architecture(section).downsample

    @classmethod
    def image_size_of(cls, section: DVAECodecConfig) -> int | None:
        return _architecture(section).image_size

    @classmethod
    def from_config(cls, section: DVAECodecConfig, *, image_size: int, channels: int, fit_images=None) -> DVAECodec:
        """The architecture (of the checkpoint, or `size`) and the threshold fitted on
        `section.fit_images` source images drawn with `section.seed`."""
        config = _architecture(section)
        if image_size != config.image_size:
            raise ValueError(f"the DVAE works on {config.image_size} px images; set data.image_size={config.image_size}")
        images = fit_images(section.fit_images, section.seed)  # (n, H, W, C) uint8
        threshold = fit_threshold(images, 2 * config.downsample, section.fine_ratio)
        return cls(config, channels=channels, threshold=threshold, fine_ratio=section.fine_ratio,
                   checkpoint=section.checkpoint, seed=section.seed)

    # --- what a model needs to know -----------------------------------------------------------
    @property
    def downsample(self) -> int:
        """Pixels per COARSE latent (2f): the data column's grid."""
        return 2 * self.config.downsample

    @property
    def latent_dim(self) -> int:
        return self.config.embed_dim

    @property
    def scale(self) -> float:
        return self.config.scale

    def side_layout(self) -> dict[str, dict[str, Any]]:
        """The side columns' shapes: the fine latents (stored like the data column) and the grain map."""
        n = self.grid[0] * self.grid[1]
        return {"fine": {"shape": (4 * n, self.latent_dim), "dtype": "latent"},
                "grain": {"shape": (n,), "dtype": "uint8", "vocab_size": 2}}

    # --- the verbs ----------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return self.autoencoder.quant_conv.weight.device

    def grain(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) uint8 -> the entropy grain map (B, h*w) uint8 at the fitted threshold."""
        self._check_images(images)
        ent = region_entropy(images.cpu(), self.downsample)  # (B, h, w)
        return rearrange(grain_map(ent, self.threshold), "b h w -> b (h w)").to(images.device)

    @torch.inference_mode()
    def encode_with_sides(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, H, W, C) uint8 -> (coarse (B, h*w, E), {"fine": (B, 4hw, E), "grain": (B, h*w) uint8}),
        the latents being posterior means x scale."""
        self._check_images(images)
        x = rearrange(images.to(self._device()).float() / 127.5 - 1.0, "b h w c -> b c h w")  # (B, C, H, W)
        post_c, post_f = self.autoencoder.encode(x)
        coarse = rearrange(post_c.mode() * self.scale, "b e h w -> b (h w) e").to(images.device)
        fine = rearrange(post_f.mode() * self.scale, "b e h w -> b (h w) e").to(images.device)
        return coarse, {"fine": fine, "grain": self.grain(images)}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) uint8 -> the coarse latents (B, h*w, E) (the sides: `encode_with_sides`)."""
        return self.encode_with_sides(images)[0]

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, fine: torch.Tensor | None = None,
               grain: torch.Tensor | None = None) -> torch.Tensor:
        """Coarse (B, h*w, E), fine (B, 4hw, E), grain (B, h*w) or (B, h, w) -> (B, H, W, C) uint8.

        Without `grain` every cell is coarse (and `fine` may be omitted)."""
        self._check_latents(latents)
        h, w = self.grid
        b = len(latents)
        dev = self._device()
        if grain is None:
            grain = torch.zeros(b, h * w, dtype=torch.uint8)
        grain = grain.reshape(b, h, w).to(dev).bool()  # (B, h, w)
        if fine is None:
            if bool(grain.any()):
                raise ValueError("a grain map with fine cells needs the fine latents")
            fine = torch.zeros(b, 4 * h * w, self.latent_dim)
        if tuple(fine.shape) != (b, 4 * h * w, self.latent_dim):
            raise ValueError(f"expected fine latents ({b}, {4 * h * w}, {self.latent_dim}), got {tuple(fine.shape)}")
        z_c = rearrange(latents.to(dev, torch.float32) / self.scale, "b (h w) e -> b e h w", h=h)
        z_f = rearrange(fine.to(dev, torch.float32) / self.scale, "b (h w) e -> b e h w", h=2 * h)
        x = self.autoencoder.decode(z_c, z_f, grain).clamp(-1.0, 1.0)  # (B, C, H, W)
        out = torch.round((x + 1.0) * 127.5).to(torch.uint8)
        return rearrange(out, "b c h w -> b h w c").to(latents.device)

    # --- identity -----------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def fitted_state(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "fine_ratio": self.fine_ratio}

    @classmethod
    def describe_state(cls, state: dict[str, Any]) -> str | None:
        return f"grain map: fine where entropy > {state['threshold']:.4g} (r_f = {state['fine_ratio']:g})"

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "weights": {"checkpoint": self.checkpoint, "seed": self.seed}}


def fit_threshold(images: torch.Tensor, region: int, fine_ratio: float) -> float:
    """The entropy threshold making a fraction `fine_ratio` of these images' regions fine
    (+-inf at r_f = 0 / 1, see raygen/models/grain.py)."""
    threshold = entropy_threshold(region_entropy(images, region), fine_ratio)
    return threshold if math.isinf(threshold) else float(f"{threshold:.9g}")


__all__ = ["DVAE_ARCHS", "DVAECodec", "DVAECodecConfig", "DynamicAutoencoder", "check_arch", "fit_threshold"]
