"""MAR's KL-16 autoencoder (LDM's KL-VAE) and a tokenizer that turns images into its latents.

The network is LDM's first-stage autoencoder as MAR ships it (`models/vae.py`): a conv encoder of
ResnetBlocks that halves the side at every level but the last, self-attention at the chosen
feature-map sides, a ResnetBlock/attention/ResnetBlock middle, and a mirrored decoder with one
extra ResnetBlock per level. The encoder returns the moments of a diagonal Gaussian posterior
(mean and log-variance, `quant_conv`); the decoder takes a latent through `post_quant_conv`.
Module names follow the official code, so at `KL_SIZES["kl16"]` the state dict has exactly the
312 keys and shapes of MAR's `kl16.ckpt` (66,456,019 values) and loads it strictly.

MAR's quirks kept for checkpoint parity: only the encoder attends (at the 16x16 level for 256 px;
MAR's decoder gets LDM's default of no attention), and `z_channels == embed_dim == 16`.
The latent scale (0.2325 for KL-16) brings the latents to roughly unit variance; the tokenizer owns
it: `encode` multiplies by it and `decode` divides by it.

Axis letters: B batch, C image channels, E latent channels, H/W image side, h/w latent side.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange
from torch import nn

# The conv blocks are the same as LlamaGen's VQ (both descend from taming/LDM); shared, not copied.
from raygen.models.tokenizers.base import read_codec_export, LatentCodec
from raygen.models.tokenizers.vq import (
    AttnBlock,
    Downsample,
    ResnetBlock,
    Upsample,
    _init_weights,
    _norm,
    _swish,
    check_conv_sizes,
)

LOGVAR_RANGE = (-30.0, 20.0)  # LDM clamps the posterior log-variance to this range


# --- config and sizes -------------------------------------------------------------------------


@dataclass
class KLConfig:
    """Architecture of the KL autoencoder; the defaults are MAR's KL-16 at 256 px."""

    ch: int = 128  # base width; level i has ch * ch_mult[i] channels (GroupNorm(32): a multiple of 32)
    ch_mult: tuple[int, ...] = field(default=(1, 1, 2, 2, 4))  # one entry per level; f = 2**(levels-1)
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (the decoder has one more)
    z_channels: int = 16  # encoder output / decoder input width (the encoder emits 2x: mean, logvar)
    embed_dim: int = 16  # latent channels E after quant_conv
    image_size: int = 256  # LDM's `resolution`: the side the attention sides refer to, and the input side
    image_channels: int = 3  # 1 (grayscale) or 3 (RGB)
    encoder_attn_resolutions: tuple[int, ...] = field(default=(16,))  # feature-map sides where the encoder attends
    decoder_attn_resolutions: tuple[int, ...] = field(default=())  # ditto for the decoder (MAR: none)
    scale: float = 0.2325  # latent scale: tokens = posterior latent * scale (MAR's KL-16 value)

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.encoder_attn_resolutions = tuple(int(r) for r in self.encoder_attn_resolutions)
        self.decoder_attn_resolutions = tuple(int(r) for r in self.decoder_attn_resolutions)
        check_conv_sizes("KLConfig", self.ch, self.ch_mult, num_res_blocks=self.num_res_blocks,
                         z_channels=self.z_channels, embed_dim=self.embed_dim, image_size=self.image_size)
        if self.image_channels not in (1, 3):
            raise ValueError(f"KLConfig.image_channels must be 1 or 3, got {self.image_channels}")
        if self.image_size % self.downsample != 0:
            raise ValueError(f"KLConfig.image_size {self.image_size} is not a multiple of the downsampling "
                             f"factor {self.downsample} (2**(len(ch_mult)-1))")
        for name in ("encoder_attn_resolutions", "decoder_attn_resolutions"):
            stray = sorted(set(getattr(self, name)) - set(self.level_sides))
            if stray:
                raise ValueError(f"KLConfig.{name} {stray} are not feature-map sides of this model; "
                                 f"at image_size {self.image_size} the levels are {list(self.level_sides)}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"KLConfig.scale must be a positive finite number, got {self.scale}")

    @property
    def downsample(self) -> int:
        """Pixels per latent along each side (f)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def level_sides(self) -> tuple[int, ...]:
        """Feature-map side at each level, from image_size down to image_size / f."""
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))


KL_SIZES: dict[str, KLConfig] = {
    # [I] digits: 16 px grayscale, f=2 (an 8x8 grid of 4 channels), attention at the 8x8 level;
    # scale 1.0 until a trained model measures its latent std.
    "debug": KLConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, image_size=16,
                      image_channels=1, encoder_attn_resolutions=(8,), scale=1.0),
    "kl16": KLConfig(),  # MAR KL-16: 256 px RGB -> 16x16x16, 66,456,019 parameters
}


# --- the network ------------------------------------------------------------------------------


def _level(c_in: int, c_out: int, n_blocks: int, attn: bool) -> nn.Module:
    """One resolution level: `block` ResnetBlocks, each followed by an attention block when `attn`."""
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(n_blocks))
    level.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_blocks if attn else 0))
    return level


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:  # (B, c_in, s, s) -> (B, c_out, s, s)
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


def _middle(c: int) -> nn.Module:
    """ResnetBlock -> attention -> ResnetBlock at the lowest resolution."""
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return mid


def _run_middle(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:  # (B, c, h, w) -> same
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class KLEncoder(nn.Module):
    """(B, C, H, W) in [-1, 1] -> (B, 2*z_channels, h, w) posterior moments before quant_conv."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.image_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip([cfg.ch, *widths[:-1]], widths)):
            level = _level(c_in, c_out, cfg.num_res_blocks, cfg.level_sides[i] in cfg.encoder_attn_resolutions)
            if i < len(widths) - 1:
                level.downsample = Downsample(c_out)
            self.down.append(level)
        self.mid = _middle(widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the lowest level's features after the middle (B, ch*mult[-1], h, w)."""
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = _run_level(level, h)  # (B, ch*mult[i], s, s)
            if hasattr(level, "downsample"):
                h = level.downsample(h)  # (B, ch*mult[i], s/2, s/2)
        return _run_middle(self.mid, h)  # (B, ch*mult[-1], h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(_swish(self.norm_out(self.features(x))))  # (B, 2*z_channels, h, w)


class KLDecoder(nn.Module):
    """(B, z_channels, h, w) -> (B, C, H, W), roughly in [-1, 1]."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        n = len(widths)
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = _middle(widths[-1])
        levels: list[nn.Module] = []  # built lowest resolution first, stored as up[0] = full resolution
        c_in = widths[-1]
        for i in reversed(range(n)):
            level = _level(c_in, widths[i], cfg.num_res_blocks + 1, cfg.level_sides[i] in cfg.decoder_attn_resolutions)
            if i > 0:
                level.upsample = Upsample(widths[i])
            levels.insert(0, level)
            c_in = widths[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.from_features(self.conv_in(z))

    def from_features(self, h: torch.Tensor) -> torch.Tensor:
        """Features after conv_in (B, ch*mult[-1], h, w) -> (B, C, H, W)."""
        h = _run_middle(self.mid, h)  # (B, ch*mult[-1], h, w)
        for level in reversed(self.up):
            h = _run_level(level, h)  # (B, ch*mult[i], s, s)
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # (B, ch*mult[i], 2s, 2s)
        return self.conv_out(_swish(self.norm_out(h)))  # (B, C, H, W)


class DiagonalGaussian:
    """The posterior N(mean, exp(logvar)) per latent element, from moments (B, 2E, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, E, h, w) each
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:  # (B, E, h, w)
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:  # (B, E, h, w)
        """mean + std * noise; the noise comes from `generator` (on the tensors' device), or torch's
        global RNG when None."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:  # (B,)
        """KL(posterior || N(0, I)), summed over each image's latent elements."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class KLAutoencoder(nn.Module):
    """The KL-VAE: `encode` images to a posterior, `decode` latents to images; `forward` trains."""

    def __init__(self, config: KLConfig):
        super().__init__()
        self.config = config
        self.encoder = KLEncoder(config)
        self.decoder = KLDecoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def initialize_weights(self, seed: int) -> None:
        """[I] PyTorch's default conv init, unit/zero GroupNorm, drawn from one seeded CPU generator
        (LDM itself relies on the global RNG); a no-op on the meta device."""
        _init_weights(self, seed)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """(B, C, H, W) images in [-1, 1] -> posterior over (B, E, h, w) latents."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))  # moments (B, 2E, h, w)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, E, h, w) unscaled latents -> (B, C, H, W) images (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, *, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(B, C, H, W) -> (reconstruction (B, C, H, W), posterior); decodes a posterior sample
        (drawn from `generator`, or torch's global RNG) unless `sample_posterior` is False."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()  # (B, E, h, w)
        return self.decode(z), posterior

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Load an official-format checkpoint strictly (see `load_kl_state_dict`); on the meta device
        the loaded tensors replace the parameters (`assign`)."""
        sd = load_kl_state_dict(path)
        check_kl_state_dict(self, sd, source=str(path))
        on_meta = any(p.is_meta for p in self.parameters())
        self.load_state_dict(sd, strict=True, assign=on_meta)


# --- checkpoints ------------------------------------------------------------------------------


EXPORT_PREFIX = "autoencoder."  # a raygen `vae` run's export holds the autoencoder under this prefix


def is_export(path: str | os.PathLike[str]) -> bool:
    """A raygen export directory (config.json + model.pt), e.g. of a `vae` training run."""
    return os.path.isdir(path) and all(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "model.pt"))


def export_config(path: str | os.PathLike[str]) -> KLConfig:
    """The autoencoder architecture a `vae` run's export directory records (its config.json), or
    the one `raygen models import kl FILE` recorded."""
    import json

    imported = read_codec_export(os.fspath(path), "kl", weights=False)
    if imported is not None:
        return KLConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in imported[1].items()})

    with open(os.path.join(path, "config.json")) as f:
        meta = json.load(f)
    if meta.get("family") != "vae":
        raise ValueError(f"{path} is an export of family {meta.get('family')!r}, not of a vae (KL autoencoder) run")
    fields = {f.name for f in dataclasses.fields(KLConfig)}
    return KLConfig(**{k: v for k, v in meta["model_config"].items() if k in fields})


def load_kl_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a KL checkpoint with `weights_only=True`: MAR's `{"model": state_dict}` (its
    `init_from_ckpt` reads `["model"]`), an LDM-style `{"state_dict": ...}`, a bare state dict,
    or a raygen `vae` run's export directory (its model.pt, the autoencoder's keys unprefixed)."""
    path = os.fspath(path)
    imported = read_codec_export(path, "kl")
    if imported is not None:  # `raygen models import kl FILE`: the official layout as it came
        return imported[0]
    if is_export(path):
        sd = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True)
        return {k[len(EXPORT_PREFIX):]: v for k, v in sd.items() if k.startswith(EXPORT_PREFIX)}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"KL autoencoder checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # training args saved beside weights
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"KL autoencoder checkpoint {path} does not load with weights_only=True: {first}") from e
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"KL autoencoder checkpoint {path} is not a state dict of tensors "
                         "(nor one under 'model' or 'state_dict')")
    return ckpt


def check_kl_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], *, source: str) -> None:
    """Raise one ValueError line naming the first few missing, unexpected and mis-shaped keys."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    misshaped = [k for k in want if k in got and got[k] != want[k]]
    if not (missing or extra or misshaped):
        return
    shown = ([f"missing {k} (expected {want[k]})" for k in missing[:3]]  # the first few of each kind
             + [f"unexpected {k} {got[k]}" for k in extra[:3]]
             + [f"{k} is {got[k]}, expected {want[k]}" for k in misshaped[:3]])
    hidden = len(missing) + len(extra) + len(misshaped) - len(shown)
    more = f"; +{hidden} more" if hidden else ""
    config = getattr(model, "config", None)
    raise ValueError(
        f"KL autoencoder checkpoint {source} does not fit {config}: {len(missing)} missing, {len(extra)} "
        f"unexpected, {len(misshaped)} mis-shaped keys: {'; '.join(shown)}{more}"
    )


# --- the tokenizer ----------------------------------------------------------------------------


@dataclass
class KLCodecConfig:
    """`tokenizer.kl`: which KL autoencoder encodes a data set, and where its weights come from."""

    size: str = field(default="kl16", metadata={"help": "a named architecture: kl16 (MAR's KL-16) or debug (digits)"})
    checkpoint: str | None = field(default=None, metadata={
        "help": "the weights: a local official-format checkpoint (never downloaded), a raygen vae run's export "
                "directory, or models:/NAME@ALIAS (a registered vae run; its architecture replaces `size`); "
                "null = random weights from seed",
        "path": True})
    seed: int = field(default=0, metadata={"help": "weights' seed when there is no checkpoint"})

    def __post_init__(self) -> None:
        if self.size not in KL_SIZES:
            raise ValueError(f"unknown KL size '{self.size}'; known: {', '.join(KL_SIZES)}")


def kl_config_at(size: str, image_size: int) -> KLConfig:
    """The named architecture at another image size. [I] The attention sides scale with the image,
    so the encoder keeps attending at the same level (MAR's KL-16: the lowest, 16 of 256 px)."""
    return _at_image_size(KL_SIZES[size], image_size)


def _at_image_size(base: KLConfig, image_size: int) -> KLConfig:
    factor = image_size / base.image_size

    def scaled(sides: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(int(r * factor) if (r * factor).is_integer() else -1 for r in sides)

    return dataclasses.replace(base, image_size=image_size, encoder_attn_resolutions=scaled(
        base.encoder_attn_resolutions), decoder_attn_resolutions=scaled(base.decoder_attn_resolutions))


class KLTokenizer(LatentCodec):
    """Images (B, H, W, C) uint8 <-> scaled latents (B, h*w, E) float32, raster order.

    [I] Grayscale images go through an RGB model (channels=1, image_channels=3) replicated to three
    channels, and decode to the channel mean, as raygen's VQ tokenizer does.
    """

    name = "kl"
    config_cls = KLCodecConfig
    has_posterior = True

    def __init__(
        self,
        config: KLConfig,
        *,
        channels: int | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        seed: int = 0,
    ):
        channels = config.image_channels if channels is None else channels
        if channels != config.image_channels and not (channels == 1 and config.image_channels == 3):
            raise ValueError(f"a KL autoencoder with image_channels={config.image_channels} cannot tokenize "
                             f"{channels}-channel images (only 1-channel images through a 3-channel model)")
        super().__init__(config, image_size=config.image_size, channels=channels)
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.seed = seed
        self.autoencoder = KLAutoencoder(config)
        self.autoencoder.initialize_weights(seed)
        if self.checkpoint is not None:
            self.autoencoder.load_checkpoint(self.checkpoint)
        self.eval()

    importable = True

    @classmethod
    def import_weights(cls, section: KLCodecConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        config = KL_SIZES[section.size]
        with torch.device("meta"):  # load_checkpoint assigns the file's tensors: no init, no copy
            autoencoder = KLAutoencoder(config)
        autoencoder.load_checkpoint(section.checkpoint)  # strict, one line naming the first bad keys
        return autoencoder.state_dict(), dataclasses.asdict(config)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> KLTokenizer:
        """Rebuild from `spec()` (the weights come back from the same checkpoint path or seed)."""
        return cls(KLConfig(**spec["config"]), channels=spec["channels"], **spec["weights"])

    @classmethod
    def downsample_of(cls, section: KLCodecConfig) -> int:
        if section.checkpoint is not None and is_export(section.checkpoint):
            return export_config(section.checkpoint).downsample
        return KL_SIZES[section.size].downsample

    @classmethod
    def image_size_of(cls, section: KLCodecConfig) -> int | None:
        if section.checkpoint is not None and is_export(section.checkpoint):
            return export_config(section.checkpoint).image_size
        return None

    @classmethod
    def from_config(cls, section: KLCodecConfig, *, image_size: int, channels: int, fit_images=None) -> KLTokenizer:
        if section.checkpoint is not None and read_codec_export(section.checkpoint, "kl", weights=False):
            config = _at_image_size(export_config(section.checkpoint), image_size)  # imported: any image size
        elif section.checkpoint is not None and is_export(section.checkpoint):
            config = export_config(section.checkpoint)  # a trained autoencoder: its own architecture
            if image_size != config.image_size:
                raise ValueError(f"the autoencoder in {section.checkpoint} was trained on {config.image_size} px "
                                 f"images; set data.image_size={config.image_size}")
        else:
            config = kl_config_at(section.size, image_size)
        return cls(config, channels=channels, checkpoint=section.checkpoint, seed=section.seed)

    # --- what a model needs to know ---------------------------------------------------------
    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def latent_dim(self) -> int:
        return self.config.embed_dim

    @property
    def scale(self) -> float:
        return self.config.scale

    # --- the verbs ----------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return self.autoencoder.quant_conv.weight.device

    def _posterior(self, images: torch.Tensor) -> DiagonalGaussian:
        """(B, H, W, C) uint8 -> posterior over unscaled (B, E, h, w) latents."""
        self._check_images(images)
        x = rearrange(images.to(self._device()).float() / 127.5 - 1.0, "b h w c -> b c h w")  # (B, C, H, W)
        x = x.expand(-1, self.config.image_channels, -1, -1)  # gray through an RGB model: replicate
        return self.autoencoder.encode(x)

    def _to_tokens(self, z: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # (B, E, h, w) -> (B, h*w, E)
        return rearrange(z, "b e h w -> b (h w) e").to(like.device)

    @torch.inference_mode()
    def encode(
        self, images: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, H, W, C) uint8 -> (B, h*w, E) latents * scale: the posterior mean, or with
        `sample=True` a draw from it using `generator` (required: on the model's device)."""
        if sample and generator is None:
            raise ValueError("KLTokenizer.encode(sample=True) needs an explicit torch.Generator")
        posterior = self._posterior(images)
        z = posterior.sample(generator) if sample else posterior.mode()  # (B, E, h, w)
        return self._to_tokens(z * self.scale, images)

    @torch.inference_mode()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[I] (B, H, W, C) uint8 -> (mean, logvar), each (B, h*w, E), of the posterior of the *scaled*
        latent: mean * scale and logvar + 2 log(scale), so mean + exp(logvar / 2) * noise is a token."""
        posterior = self._posterior(images)
        mean = self._to_tokens(posterior.mean * self.scale, images)
        logvar = self._to_tokens(posterior.logvar + 2.0 * math.log(self.scale), images)
        return mean, logvar

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, h*w, E) scaled latents -> (B, H, W, C) uint8."""
        self._check_latents(latents)
        z = rearrange(latents.to(self._device(), torch.float32) / self.scale, "b (h w) e -> b e h w",
                      h=self.grid[0])  # (B, E, h, w)
        x = self.autoencoder.decode(z).clamp(-1.0, 1.0)  # (B, image_channels, H, W)
        if self.channels != x.shape[1]:
            x = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
        out = torch.round((x + 1.0) * 127.5).to(torch.uint8)
        return rearrange(out, "b c h w -> b h w c").to(latents.device)

    # --- identity -----------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def spec(self) -> dict[str, Any]:
        """The codec's spec plus `weights`: where the weights came from (not fingerprinted: the
        weights themselves are)."""
        return {**super().spec(), "weights": {"checkpoint": self.checkpoint, "seed": self.seed}}


__all__ = [
    "KL_SIZES",
    "KLCodecConfig",
    "kl_config_at",
    "DiagonalGaussian",
    "KLAutoencoder",
    "KLConfig",
    "KLTokenizer",
    "check_kl_state_dict",
    "export_config",
    "is_export",
    "load_kl_state_dict",
]
