"""Family `vae`: training a KL autoencoder (MAR's KL-16 architecture) as a tokenizer.

It trains on `images` shards (`raygen tokenize --tokenizer images`), through the same Ray Train +
DeepSpeed + MLflow path as the generators; a critic (PatchGAN) trains beside it with its own
optimizer from `model.arch.disc_start` on. Its export is a codec, not a sampler: the platform logs
originals above reconstructions and reconstruction metrics, and records the latent scale it
measured on the data. Registered (`raygen models register RUN --name NAME`), it encodes data sets:
`raygen tokenize --tokenizer kl tokenizer.kl.checkpoint=models:/NAME@latest`.

The perceptual (LPIPS) term needs its weights as a local file (`vae.perceptual_weights`, never
downloaded; see raygen/models/tokenizers/ae_losses.py for the format and how to make it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raygen.errors import ConfigError, UserError
from raygen.families import register
from raygen.families.base import DataInfo, Family, Prepared
from raygen.options import option


@dataclass
class VAESettings:
    perceptual_weights: str | None = option(
        None, path=True, help="local file with the LPIPS weights (VGG16 + lin layers) for the perceptual term; "
                              "null = no perceptual term (never downloaded)")


class VAE(Family):
    name = "vae"
    data_kind = "images"
    settings = VAESettings
    settings_help = "KL autoencoder training (family vae)"

    def arch_from_data(self, data: DataInfo) -> dict[str, Any]:
        """The autoencoder's input is the data set's images: their side and channels."""
        if data.grid[0] != data.grid[1]:
            raise UserError(f"the data set's images are {data.grid[0]}x{data.grid[1]}; the {self.name} family "
                            "needs square images")
        return {"image_size": data.grid[0], "image_channels": data.token_dim, "num_classes": data.num_classes}

    def prepare(self, cfg, manifest: dict[str, Any], data_dir: str, arch: dict[str, Any]) -> Prepared:
        from raygen.models.registry import model_config

        try:  # the attention sides follow the image size (MAR's KL-16 attends at its lowest level)
            resolved = model_config(self.name, cfg.model.size, **arch)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        path = getattr(cfg, self.name).perceptual_weights
        if path is None:
            return Prepared(params={"derived.perceptual": "off"})
        from raygen.models.tokenizers.ae_losses import Perceptual

        try:
            Perceptual.from_file(path)  # every key and shape, before a worker starts
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{self.name}.perceptual_weights: {str(e).splitlines()[0]}") from None
        weight = resolved.perceptual_weight
        return Prepared(payload={"perceptual_weights": path}, params={"derived.perceptual": f"lpips x {weight:g}"},
                        export={"perceptual_weights": path})

    def bind(self, model, payload: dict[str, Any] | None) -> None:
        if payload and payload.get("perceptual_weights"):
            from raygen.models.tokenizers.ae_losses import Perceptual

            model.attach_perceptual(Perceptual.from_file(payload["perceptual_weights"]))

    def can_sample(self, meta: dict[str, Any]) -> bool:
        return False

    def can_reconstruct(self, meta: dict[str, Any]) -> bool:
        return True

    def finalize_export(self, model, meta: dict[str, Any], images: torch.Tensor) -> dict[str, Any]:
        """[I] The latent scale that gives the data's posterior means unit variance (LDM's recipe
        behind 0.18215, and MAR's 0.2325), rounded to 4 significant digits."""
        std = model.latent_std(images)
        scale = float(f"{1.0 / max(std, 1e-6):.4g}")
        return {"arch": {**meta["arch"], "scale": scale}, "model_config": {**meta["model_config"], "scale": scale},
                "latent_std": std}


register(VAE())


class DynamicVAE(VAE):
    """Family `dvae`: D2iT's Dynamic VAE (raygen/models/dvae.py), two grains of KL latents merged by a
    grain map, trained like the KL-VAE. Registered, it encodes data sets with the `dvae` codec:
    `raygen tokenize --tokenizer dvae tokenizer.dvae.checkpoint=models:/NAME@ALIAS` (coarse latents,
    the fine latents and the entropy grain map, for family d2it)."""

    name = "dvae"
    settings_help = "Dynamic VAE training (family dvae)"


register(DynamicVAE())
