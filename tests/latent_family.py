"""A minimal continuous family for the tests, registered from outside raygen like a user's plugin.

`latent-mean` reads latents (B, L, D) and learns, per class, the mean latent of that class (a
class embedding -> linear map, MSE loss); it samples the mean plus `temperature` times a learned
per-class scale of Gaussian noise. It stands in for a continuous family until eMIGM lands: the
point is the platform path (latent shards, Ray Train + DeepSpeed, export, decode through the
data set's codec), not the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raygen import families
from raygen.families import Family
from raygen.models.base import FamilySpec, GenerativeModel, ModelConfig
from raygen.models.registry import MODEL_REGISTRY, register_family


@dataclass
class LatentMeanConfig(ModelConfig):
    vocab_size: int = 1  # unused: the data are latents
    token_dim: int = 1  # D, from the data


class LatentMean(GenerativeModel):
    """Per-class mean latent (and log-scale) as two embedding tables."""

    def __init__(self, config: LatentMeanConfig):
        super().__init__()
        self.config = config
        n = config.seq_len * config.token_dim
        self.mean = nn.Embedding(config.num_classes, n)
        self.log_scale = nn.Embedding(config.num_classes, n)
        nn.init.zeros_(self.mean.weight)
        nn.init.zeros_(self.log_scale.weight)

    def forward(self, batch: dict[str, torch.Tensor], *, generator: torch.Generator | None = None):
        x = batch["latents"].flatten(1)  # (B, L*D)
        mu, log_s = self.mean(batch["label"]), self.log_scale(batch["label"])
        nll = 0.5 * ((x - mu) / log_s.exp()).pow(2) + log_s  # Gaussian NLL per value, up to a constant
        return {"loss": nll.mean(), "mse": (x - mu).pow(2).mean().detach()}

    @torch.inference_mode()
    def generate(self, labels: torch.Tensor, *, cfg_scale: float = 1.0, steps: int | None = None,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        labels = self.check_labels(labels)
        mu, s = self.mean(labels), self.log_scale(labels).exp()
        noise = torch.randn(mu.shape, generator=generator, device=mu.device)
        out = mu + temperature * s * noise  # (B, L*D)
        return out.reshape(len(labels), self.config.seq_len, self.config.token_dim)

    def flops_per_sample(self) -> float:
        return float(6 * self.config.seq_len * self.config.token_dim)


class LatentMeanFamily(Family):
    name = "latent-mean"
    data_kind = "latents"

    def can_sample(self, meta: dict[str, Any]) -> bool:
        return True


if "latent-mean" not in MODEL_REGISTRY:
    register_family(FamilySpec(family="latent-mean", model_cls=LatentMean, config_cls=LatentMeanConfig,
                               sizes={"debug": LatentMeanConfig()}))
families.register(LatentMeanFamily())
