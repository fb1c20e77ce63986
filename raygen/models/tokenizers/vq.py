"""LlamaGen's VQ-16 image tokenizer (taming-style conv encoder/decoder, l2-normalized codes).

The module layout follows LlamaGen's `tokenizer/tokenizer_image/vq_model.py`, so at the
default config `state_dict()` has exactly the keys and shapes of the official checkpoint
(`vq_ds16_c2i.pt`) and loads it with `strict=True`. Without a checkpoint the weights are a
reproducible random init from `config.seed` (for tests and small demos).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from raygen.models.tokenizers.base import Tokenizer, config_to_dict, read_codec_export

_USAGE_SLOTS = 65536  # length of the official (unused here) `quantize.codebook_used` buffer


@dataclass
class VQConfig:
    """Architecture of the VQ tokenizer; the defaults are LlamaGen's VQ-16."""

    codebook_size: int = 16384
    embed_dim: int = 8
    ch: int = 128
    ch_mult: tuple[int, ...] = field(default=(1, 1, 2, 2, 4))
    z_channels: int = 256
    num_res_blocks: int = 2
    checkpoint: str | None = None  # local path to an official-format checkpoint
    seed: int = 0  # random init when there is no checkpoint

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        check_conv_sizes("VQConfig", self.ch, self.ch_mult, codebook_size=self.codebook_size,
                         embed_dim=self.embed_dim, z_channels=self.z_channels, num_res_blocks=self.num_res_blocks)


def check_conv_sizes(what: str, ch: int, ch_mult: tuple[int, ...], **sizes: int) -> None:
    """The size rules of the LDM-style conv autoencoders (VQ-16, KL-16): positive sizes, a
    non-empty ch_mult, and a base width GroupNorm(32) can split."""
    bad: dict[str, Any] = {k: v for k, v in {"ch": ch, **sizes}.items() if v < 1}
    if not ch_mult or min(ch_mult) < 1:
        bad["ch_mult"] = ch_mult
    if bad:
        raise ValueError(f"{what} sizes must be positive and ch_mult non-empty, got {bad}")
    if ch % 32 != 0:
        raise ValueError(f"{what}.ch must be a multiple of 32 (GroupNorm uses 32 groups), got {ch}")


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice, plus a (1x1-projected when needed) residual."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(0.0)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, c_in, H, W) -> (B, c_out, H, W)
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, with a residual."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> same
        _, c, hgt, _ = x.shape
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, scale=c**-0.5)  # (B, 1, HW, C)
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=hgt))


class Downsample(nn.Module):
    """Halve H and W: zero-pad right/bottom by one, then a stride-2 3x3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(c_in: int, c_out: int, n_res: int, attn: bool, resample: nn.Module | None, name: str) -> nn.Module:
    """One resolution level: `res` blocks, an attention block after each (if `attn`), and a resampler."""
    block = nn.Module()
    block.res = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(n_res))
    block.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_res if attn else 0))
    if resample is not None:
        setattr(block, name, resample)
    return block


def _run_level(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, res in enumerate(block.res):
        h = res(h)
        if len(block.attn):
            h = block.attn[i](h)
    return h


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, z_channels, H/f, W/f)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult, n = cfg.ch_mult, len(cfg.ch_mult)
        in_mult = (1,) + mult
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList(
            _level(cfg.ch * in_mult[i], cfg.ch * mult[i], cfg.num_res_blocks, attn=i == n - 1,
                   resample=Downsample(cfg.ch * mult[i]) if i < n - 1 else None, name="downsample")
            for i in range(n))
        c = cfg.ch * mult[-1]
        self.mid = nn.ModuleList([ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)])
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = _run_level(block, h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*f, w*f)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult, n = cfg.ch_mult, len(cfg.ch_mult)
        c = cfg.ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)])
        blocks = []
        for i in range(n):
            c_out = cfg.ch * mult[n - 1 - i]
            blocks.append(_level(c, c_out, cfg.num_res_blocks + 1, attn=i == 0,
                                 resample=Upsample(c_out) if i < n - 1 else None, name="upsample"))
            c = c_out
        self.conv_blocks = nn.ModuleList(blocks)
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            h = _run_level(block, h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup in an l2-normalized codebook."""

    def __init__(self, codebook_size: int, embed_dim: int):
        super().__init__()
        self.register_buffer("codebook_used", torch.zeros(_USAGE_SLOTS))  # kept for checkpoint parity
        self.embedding = nn.Embedding(codebook_size, embed_dim)

    def codes(self) -> torch.Tensor:  # (V, E), unit rows
        return F.normalize(self.embedding.weight, dim=-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, E, h, w) float -> (B, h, w) int64
        b, _, h, w = z.shape
        flat = F.normalize(rearrange(z, "b e h w -> (b h w) e"), dim=-1)
        e = self.codes()
        dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()  # (BHW, V)
        return dist.argmin(dim=1).view(b, h, w)


@torch.no_grad()
def _init_weights(model: nn.Module, seed: int) -> None:
    """PyTorch's default init for every conv/norm, drawn on CPU from one seeded generator."""
    if any(p.is_meta for p in model.parameters()):
        return  # shapes only (e.g. `with torch.device("meta")`): nothing to draw
    g = torch.Generator().manual_seed(seed)

    def uniform(p: torch.Tensor, bound: float) -> None:
        p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=g))

    for m in model.modules():
        if isinstance(m, nn.Conv2d):  # kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))
            bound = 1 / math.sqrt(m.weight[0].numel())
            uniform(m.weight, bound)
            uniform(m.bias, bound)
        elif isinstance(m, nn.GroupNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            n = m.num_embeddings
            uniform(m.weight, 1.0 / n)
            m.weight.copy_(F.normalize(m.weight, dim=-1))


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    exported = read_codec_export(path, "vq")  # `raygen models import vq FILE`'s export (models:/ resolves to it)
    if exported is not None:
        return exported[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VQ tokenizer checkpoint not found: {path}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"VQ tokenizer checkpoint {path} is not a dict (got {type(ckpt).__name__})")
    for key in ("ema", "model", "state_dict"):  # LlamaGen prefers the EMA weights when present
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return ckpt


def _with_export_arch(section: VQConfig) -> VQConfig:
    """The section with an imported export's architecture when its checkpoint is one (config.json
    says which architecture the weights have; the section's own fields are then not used)."""
    if section.checkpoint is None or not os.path.isdir(section.checkpoint):
        return section
    exported = read_codec_export(section.checkpoint, "vq", weights=False)
    if exported is None:
        return section
    arch = exported[1]
    return dataclasses.replace(section, **{**arch, "ch_mult": tuple(arch["ch_mult"])})


class VQTokenizer(Tokenizer):
    """LlamaGen VQ tokenizer: (B, H, W, C) uint8 <-> (B, H/f, W/f) ids, f = 2**(len(ch_mult)-1)."""

    name = "vq"
    config_cls = VQConfig

    def __init__(self, config: VQConfig, *, image_size: int, channels: int):
        super().__init__(config, image_size=image_size, channels=channels)
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        self.quantize = VectorQuantizer(config.codebook_size, config.embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        _init_weights(self, config.seed)
        if config.checkpoint is not None:
            self._load(config.checkpoint)
        self.eval()

    importable = True

    @classmethod
    def downsample_of(cls, section: VQConfig) -> int:
        return 2 ** (len(_with_export_arch(section).ch_mult) - 1)

    @classmethod
    def from_config(cls, section: VQConfig, *, image_size: int, channels: int, fit_images=None) -> VQTokenizer:
        return cls(_with_export_arch(section), image_size=image_size, channels=channels)

    @classmethod
    def import_weights(cls, section: VQConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tok = cls(section, image_size=cls.downsample_of(section), channels=3)  # loads and checks strictly
        arch = {k: v for k, v in config_to_dict(section).items() if k not in ("checkpoint", "seed")}
        return tok.state_dict(), arch

    def _load(self, path: str) -> None:
        sd = _load_state_dict(path)
        own = self.state_dict()
        problems = [f"missing {k}" for k in own if k not in sd]
        problems += [f"unexpected {k}" for k in sd if k not in own]
        problems += [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                     for k, v in own.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
        if problems:
            more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(f"VQ tokenizer checkpoint {path} does not match the expected config "
                             f"{self.config_dict()}: {'; '.join(problems[:5])}{more}")
        self.load_state_dict(sd, strict=True)

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    def _device(self) -> torch.device:
        return self.quant_conv.weight.device

    @torch.inference_mode()
    def quantize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, h, w) float latents -> (B, h, w) int64 ids of the nearest codes."""
        return self.quantize(z.to(self._device(), torch.float32))

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        x = rearrange(images.to(self._device()).float() / 127.5 - 1.0, "b h w c -> b c h w")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        z = self.quant_conv(self.encoder(x))  # (B, embed_dim, h, w)
        return self.quantize(z).to(images.device)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check_tokens(tokens)
        ids = tokens.to(self._device(), torch.long)
        z = rearrange(self.quantize.codes()[ids], "b h w e -> b e h w")  # (B, embed_dim, h, w)
        x = self.decoder(self.post_quant_conv(z)).clamp(-1.0, 1.0)  # (B, 3, H, W)
        if self.channels == 1:
            x = x.mean(dim=1, keepdim=True)
        out = torch.round((x + 1.0) * 127.5).to(torch.uint8)
        return rearrange(out, "b c h w -> b h w c").to(tokens.device)

    @torch.no_grad()
    def codebook(self) -> torch.Tensor:
        return self.quantize.codes().float().clone()

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    def fingerprint(self) -> str:
        """As the base, but without `checkpoint`/`seed`: they only choose weights, which are hashed."""
        spec = self.spec()
        spec["config"] = {k: v for k, v in spec["config"].items() if k not in ("checkpoint", "seed")}
        h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
        for key, value in sorted(self.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().to("cpu").contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


__all__ = ["VQConfig", "VQTokenizer"]
