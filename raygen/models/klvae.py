"""Training MAR's KL autoencoder: the objective LDM trains its KL-VAEs with, as a raygen model.

`KLVAE` wraps `KLAutoencoder` (raygen/models/tokenizers/kl.py) with its training loss:

    loss = rec + perceptual_weight * lpips + kl_weight * kl + disc_weight * g_adv

  rec      mean |x - x_hat| (or squared) per pixel value, on a posterior sample's decoding
  lpips    the LPIPS distance (`Perceptual`), only when its weights file is given (never downloaded)
  kl       KL(posterior || N(0, I)) summed over an image's latent elements, divided by the image's
           pixel values: with rec a per-pixel mean this is LDM's objective (its sums) / (H*W*C),
           so LDM's kl_weight (1e-6) means the same here
  g_adv    -mean(D(x_hat)) once the critic trains (optimizer step >= disc_start)

[I] LDM weights g_adv adaptively (the ratio of the gradient norms of the other terms and of
g_adv at the decoder's last layer). That needs a second autograd pass over parameters that
ZeRO-3 partitions; raygen uses a fixed weight (disc_weight, 0.1 by default as in MaskGIT-style
VQGAN trainers) and no learned output log-variance (LDM's starts at 0 and barely moves).

The critic is a PatchGAN (`PatchDiscriminator`) trained on hinge (or vanilla) loss with its own
optimizer; the training loop owns it (`make_critic`, see raygen/models/base.py), so the
autoencoder's weights and export never include it. The LPIPS network is frozen and held outside
the module tree (`attach_perceptual`): no optimizer, ZeRO partition or export sees it either.

The export (family `vae`) holds the autoencoder's state dict under `autoencoder.`; the `kl` codec
reads it back (`raygen tokenize --tokenizer kl tokenizer.kl.checkpoint=models:/NAME@ALIAS`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from einops import rearrange
from torch import nn

from raygen.models.base import FamilySpec, TrainableModel
from raygen.models.tokenizers.ae_losses import (
    PatchDiscriminator,
    Perceptual,
    generator_loss,
    hinge_d_loss,
    vanilla_d_loss,
)
from raygen.models.tokenizers.base import psnr
from raygen.models.tokenizers.kl import KL_SIZES, KLAutoencoder, KLConfig

D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


@dataclass
class KLVAEConfig(KLConfig):
    """The autoencoder's architecture (KLConfig's fields) and its training objective."""

    num_classes: int = 1  # what the data set has (labels are not used)
    rec_loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6  # LDM's KL-VAE value (see the module docstring for the normalisation)
    perceptual_weight: float = 1.0  # applies only when LPIPS weights are attached
    disc_weight: float = 0.1  # 0 = no critic
    disc_start: int = 50001  # optimizer step the critic starts at (LDM's kl-f16 config: 50001)
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_ndf: int = 64  # the critic's base width
    disc_layers: int = 3  # the critic's stride-2 conv layers (PatchGAN 70x70 at 3)
    disc_norm: Literal["batch", "group"] = "batch"  # batch: the official PatchGAN (statistics per rank)
    sample_posterior: bool = True  # decode a posterior sample (LDM) or its mean while training
    seed: int = 0  # weights' seed

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("kl_weight", "perceptual_weight", "disc_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be l1 or l2, got {self.rec_loss!r}")
        if self.disc_loss not in D_LOSSES:
            raise ValueError(f"disc_loss must be one of {', '.join(D_LOSSES)}, got {self.disc_loss!r}")
        if self.disc_start < 0 or self.disc_layers < 1 or self.disc_ndf < 1:
            raise ValueError("disc_start must be >= 0, disc_layers and disc_ndf >= 1")

    def autoencoder(self) -> KLConfig:
        """The architecture alone (what the `kl` codec is built from)."""
        return KLConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(KLConfig)})


def arch_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The KLConfig fields of a KLVAEConfig as JSON (an export's model_config) -> KLConfig kwargs."""
    return {f.name: config[f.name] for f in dataclasses.fields(KLConfig) if f.name in config}


class Critic(nn.Module):
    """The PatchGAN discriminator and its loss: {"real", "fake"} images -> {"loss", logits means}."""

    def __init__(self, cfg: KLVAEConfig):
        super().__init__()
        self.disc = PatchDiscriminator(in_channels=cfg.image_channels, ndf=cfg.disc_ndf, n_layers=cfg.disc_layers,
                                       norm=cfg.disc_norm)
        self.disc.initialize_weights(cfg.seed + 1)
        self.d_loss = D_LOSSES[cfg.disc_loss]

    def forward(self, batch: dict[str, torch.Tensor], **_: Any) -> dict[str, torch.Tensor]:
        logits_real = self.disc(batch["real"])  # (B, 1, h, w)
        logits_fake = self.disc(batch["fake"])  # (B, 1, h, w)
        return {"loss": self.d_loss(logits_real, logits_fake),
                "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": 0.0}]


class KLVAE(TrainableModel):
    """KLAutoencoder + its objective. forward({"images": (B, H, W, C) uint8}) -> losses and metrics."""

    def __init__(self, config: KLVAEConfig):
        super().__init__()
        self.config = config
        self.autoencoder = KLAutoencoder(config.autoencoder())
        self.autoencoder.initialize_weights(config.seed)
        self.__dict__["perceptual"] = None  # frozen, outside the module tree (see attach_perceptual)

    def attach_perceptual(self, perceptual: Perceptual | None) -> None:
        """Use an LPIPS network in the loss (not a submodule: no optimizer, ZeRO or export sees it)."""
        if perceptual is not None:
            perceptual = perceptual.to(self.autoencoder.quant_conv.weight.device).eval()
        self.__dict__["perceptual"] = perceptual

    # --- the critic ----------------------------------------------------------------------------
    def make_critic(self) -> Critic | None:
        return Critic(self.config) if self.config.disc_weight > 0 else None

    @property
    def critic_start(self) -> int:
        return self.config.disc_start

    # --- training ------------------------------------------------------------------------------
    def images_in(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) uint8 -> (B, C, H, W) float in [-1, 1], checked against the config."""
        c = self.config
        if images.ndim != 4 or tuple(images.shape[1:]) != (c.image_size, c.image_size, c.image_channels):
            raise ValueError(f"expected images (B, {c.image_size}, {c.image_size}, {c.image_channels}), "
                             f"got {tuple(images.shape)}")
        return rearrange(images.float() / 127.5 - 1.0, "b h w c -> b c h w")

    def forward(self, batch: dict[str, torch.Tensor], *, generator: torch.Generator | None = None,
                critic: Critic | None = None, **_: Any) -> dict[str, torch.Tensor]:
        c = self.config
        self.check_generator(generator)
        x = self.images_in(batch["images"])  # (B, C, H, W)
        x_hat, kl_image = self.autoencode(x, generator)  # (B, C, H, W), (B,)
        err = x_hat - x  # (B, C, H, W)
        rec = err.abs().mean() if c.rec_loss == "l1" else err.pow(2).mean()
        kl = kl_image.mean() / x[0].numel()  # per pixel value, see the module docstring
        loss = rec + c.kl_weight * kl
        out: dict[str, torch.Tensor] = {}
        perceptual = self.__dict__["perceptual"]
        if perceptual is not None and c.perceptual_weight > 0:
            p_loss = perceptual(x, x_hat).mean()
            loss = loss + c.perceptual_weight * p_loss
            out["perceptual"] = p_loss.detach()
        if critic is not None:
            g_adv = generator_loss(critic.disc(x_hat))  # the critic is frozen by the loop
            loss = loss + c.disc_weight * g_adv
            out["g_adv"] = g_adv.detach()
            out["critic_batch"] = {"real": x.detach(), "fake": x_hat.detach()}
        with torch.no_grad():
            mse = (x_hat.clamp(-1, 1) - x).pow(2).flatten(1).mean(dim=1)  # (B,)
            out.update(l1=err.abs().mean(), l2=err.pow(2).mean(), kl=kl_image.mean(),
                       psnr=psnr(mse).mean())
        return {"loss": loss, **out}

    # --- the autoencoder's part (a subclass with another autoencoder overrides these) ----------
    def autoencode(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: x (B, C, H, W) -> (reconstruction (B, C, H, W) float32, KL per image (B,))."""
        posterior = self.autoencoder.encode(x)  # over (B, E, h, w)
        z = posterior.sample(generator) if self.config.sample_posterior else posterior.mode()  # (B, E, h, w)
        return self.autoencoder.decode(z).float(), posterior.kl()

    def decode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> the reconstruction from the posterior mean (B, C, H, W)."""
        return self.autoencoder.decode(self.autoencoder.encode(x).mode())

    def latent_means(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> the posterior means, unscaled (any shape)."""
        return self.autoencoder.encode(x).mode()

    # --- using it ------------------------------------------------------------------------------
    @torch.inference_mode()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) uint8 -> reconstructions (B, H, W, C) uint8 from the posterior mean."""
        with self.evaluating():
            x_hat = self.decode_mean(self.images_in(images.to(self.device))).clamp(-1, 1)  # (B, C, H, W)
        u = torch.round((x_hat + 1) * 127.5).to(torch.uint8)
        return rearrange(u, "b c h w -> b h w c").cpu()

    @torch.inference_mode()
    def latent_std(self, images: torch.Tensor) -> float:
        """Standard deviation of the posterior means of these images (the unscaled latents)."""
        with self.evaluating():
            return float(self.latent_means(self.images_in(images.to(self.device))).float().std())

    def flops_per_sample(self) -> float:
        """Forward + backward FLOPs of the autoencoder on one image (3x a forward counted on the
        meta device; the critic and LPIPS are not counted)."""
        from torch.utils.flop_counter import FlopCounterMode

        cfg = self.config.autoencoder()
        with torch.device("meta"):
            ae = KLAutoencoder(cfg)
            x = torch.empty(1, cfg.image_channels, cfg.image_size, cfg.image_size)
        with FlopCounterMode(display=False) as counter:
            ae(x, sample_posterior=False)
        return 3.0 * counter.get_total_flops()


def _size(base: KLConfig, **objective: Any) -> KLVAEConfig:
    return KLVAEConfig(**dataclasses.asdict(base), **objective)


KLVAE_SIZES: dict[str, KLVAEConfig] = {
    # digits: 16 px grayscale, an 8x8 grid of 4 channels; no critic (a CPU preset)
    "debug": _size(KL_SIZES["debug"], disc_weight=0.0),
    # RGB photographs at 64 px, f=8: an 8x8 grid of 8 channels; the critic from step 50001 unless
    # the preset says otherwise (kl-photos: 5000)
    "photos": _size(KLConfig(ch=64, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=8, embed_dim=8, image_size=64,
                             image_channels=3, encoder_attn_resolutions=(8,), scale=1.0)),
    # MAR's KL-16 at 256 px: 66,456,019 parameters, the critic from step 50001 as LDM's kl-f16
    "kl16": _size(KL_SIZES["kl16"]),
}

KLVAE_FAMILY = FamilySpec("vae", KLVAE, KLVAEConfig, KLVAE_SIZES)

__all__ = ["KLVAE", "KLVAEConfig", "KLVAE_SIZES", "KLVAE_FAMILY", "Critic", "arch_fields"]
