"""The codec contract every tokenizer in raygen follows.

A codec is built for one image size and channel count. It maps uint8 images (B, H, W, C) to
one token per cell of an (h, w) grid and back. A `Tokenizer` makes integer ids (kind "ids",
ids in [0, vocab_size)); a `LatentCodec` makes continuous vectors (kind "latents", (B, h*w, D)
floats, already multiplied by the codec's own latent scale). `spec()` is a small JSON-able
description (name, config, fitted state) that rebuilds the same codec with
`raygen.models.tokenizers.from_spec`; `fingerprint()` hashes the spec together with the
weights, so a data set's manifest pins exactly the codec that produced it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn


class Codec(nn.Module, ABC):
    """Images (B, H, W, C) uint8 <-> one token per grid cell (ids or latents, by subclass)."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "ids", "latents" or "images": what encode() returns
    config_cls: ClassVar[type]  # the codec's config section (tokenizer.<name>)

    def __init__(self, config: Any, *, image_size: int, channels: int):
        super().__init__()
        self.config = config  # the codec's architecture config (its section, or what it implies)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if image_size % self.downsample != 0:
            raise ValueError(
                f"image_size {image_size} is not a multiple of the {self.name} tokenizer's "
                f"downsampling factor {self.downsample}"
            )
        self.image_size = image_size
        self.channels = channels

    # --- what a model needs to know -------------------------------------------------
    @property
    def downsample(self) -> int:
        """Pixels per token along each side."""
        return self.downsample_of(self.config)

    @classmethod
    def downsample_of(cls, section: Any) -> int:
        """Pixels per token side of the codec a config section describes (no weights loaded)."""
        return section.patch

    @classmethod
    def image_size_of(cls, section: Any) -> int | None:
        """The image side a config section fixes (a trained codec's), or None (any multiple of
        the downsampling factor)."""
        return None

    # --- released weights (`raygen models import`) --------------------------------------
    importable: ClassVar[bool] = False  # its weights come as official-format checkpoint files

    @classmethod
    def import_weights(cls, section: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(the checkpoint's state dict in the official layout, checked key by key against the
        architecture `section` names; that architecture as JSON) for `section.checkpoint`.
        ValueError / FileNotFoundError when it does not fit."""
        raise ValueError(f"the {cls.name} codec has no released weights to import")

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "Codec":
        """Rebuild from `spec()` for a codec whose config alone determines it (+ weights by seed or path)."""
        return cls(cls.config_cls(**spec["config"]), image_size=spec["image_size"], channels=spec["channels"])

    @classmethod
    def from_config(cls, section: Any, *, image_size: int, channels: int,
                    fit_images: Callable[[int, int], torch.Tensor] | None = None) -> "Codec":
        """The codec for images of this size from its config section. A codec fitted to data
        (the palette) draws `fit_images(n, seed)`: n source images (N, H, W, C) uint8."""
        return cls(section, image_size=image_size, channels=channels)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.downsample
        return (side, side)

    # --- the two verbs ----------------------------------------------------------------
    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) uint8 -> tokens."""

    @abstractmethod
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens -> (B, H, W, C) uint8."""

    # --- identity ---------------------------------------------------------------------
    @abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """The tokenizer's own config as plain JSON values."""

    def fitted_state(self) -> dict[str, Any]:
        """State learned from data that the config alone does not determine (JSON)."""
        return {}

    @classmethod
    def describe_state(cls, state: dict[str, Any]) -> str | None:
        """One line about a fitted state worth showing the user after tokenizing (None: nothing)."""
        return None

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image_size": self.image_size,
            "channels": self.channels,
            "config": self.config_dict(),
            "state": self.fitted_state(),
        }

    def fingerprint(self) -> str:
        """sha256 over the spec (less `weights`: where they came from) and every tensor of the
        state dict (16 hex digits)."""
        spec = {k: v for k, v in self.spec().items() if k != "weights"}
        h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
        for key, value in sorted(self.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().to("cpu").contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # --- helpers for subclasses -------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (B, H, W, C), got {images.dtype} {tuple(images.shape)}")
        _, h, w, c = images.shape
        if (h, w, c) != (self.image_size, self.image_size, self.channels):
            raise ValueError(
                f"expected images of {self.image_size}x{self.image_size}x{self.channels}, got {h}x{w}x{c}"
            )


class Tokenizer(Codec):
    """Images (B, H, W, C) uint8 <-> token ids (B, h, w) int64."""

    kind = "ids"

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct token ids; ids lie in [0, vocab_size)."""

    def codebook(self) -> torch.Tensor:
        """(vocab_size, E) float vectors behind the ids (for clustering)."""
        raise NotImplementedError(f"the {self.name} tokenizer has no codebook")

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != self.grid:
            raise ValueError(f"expected tokens (B, {self.grid[0]}, {self.grid[1]}), got {tuple(tokens.shape)}")
        lo, hi = (int(tokens.min()), int(tokens.max())) if tokens.numel() else (0, 0)
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{lo}, {hi}]")


class LatentCodec(Codec):
    """Images (B, H, W, C) uint8 <-> latents (B, h*w, D) float, in the codec's scaled units."""

    kind = "latents"

    @property
    @abstractmethod
    def latent_dim(self) -> int:
        """D: channels per token."""

    @property
    def scale(self) -> float:
        """The factor the codec applied to its raw latents (recorded in the manifest)."""
        return 1.0

    has_posterior: ClassVar[bool] = False  # encode_moments() gives a Gaussian posterior per latent

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) uint8 -> the posterior's (mean, logvar), each (B, L, D), of the scaled latents."""
        raise NotImplementedError(f"the {self.name} codec has no posterior")

    def side_layout(self) -> dict[str, dict[str, Any]]:
        """Side columns the codec writes beside the latents: name -> {"shape", "dtype" ("latent" =
        the data column's dtype, or a storage dtype), optional "vocab_size"}; none by default."""
        return {}

    def encode_with_sides(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, H, W, C) uint8 -> (latents (B, L, D), {side column: (B, *shape)}); `decode` takes the
        sides back as keyword arguments."""
        return self.encode(images), {}

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(L, D) per image: L = h * w tokens in raster order."""
        h, w = self.grid
        return (h * w, self.latent_dim)

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 3 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"expected latents (B, {self.latent_shape[0]}, {self.latent_shape[1]}), "
                             f"got {tuple(latents.shape)}")


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2) from their per-image MSE (B,)."""
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


CODEC_EXPORT = "codec"  # config.json key naming the codec of an imported codec's export directory


def read_codec_export(path: str, codec: str, *, weights: bool = True
                      ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]] | None:
    """(state dict (None without `weights`), architecture) of the export `raygen models import
    CODEC` wrote at `path`; None when `path` is not such a directory; ValueError when it is
    another codec's."""
    import os

    meta_path = os.path.join(path, "config.json")
    if not (os.path.isdir(path) and os.path.isfile(meta_path) and os.path.isfile(os.path.join(path, "model.pt"))):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    if CODEC_EXPORT not in meta:
        return None
    if meta[CODEC_EXPORT] != codec:
        raise ValueError(f"{path} holds an imported {meta[CODEC_EXPORT]} tokenizer, not a {codec} one")
    state = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True) if weights else None
    return state, meta["config"]
