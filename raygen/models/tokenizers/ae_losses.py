"""Loss parts for training a KL/VQ autoencoder: a PatchGAN discriminator, its GAN losses and LPIPS.

`PatchDiscriminator` is taming-transformers' / LDM's `NLayerDiscriminator` (pix2pix PatchGAN). Its
layers live in one `main` nn.Sequential at the official indices, so an official state dict loads
strictly (norm="batch", the official choice). norm="group" swaps each BatchNorm2d for a GroupNorm
(largest group count <= 32 dividing the width): BatchNorm statistics are per rank under data parallel.

`Perceptual` is LPIPS v0.1 with the VGG16 trunk (the `lpips` package, net='vgg', lpips=True):
VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, each unit-normalised over channels,
squared difference, a non-negative 1x1 'lin' conv to one channel, spatial mean, summed over layers.

Weights file (one file, never downloaded; `Perceptual.from_file`): a torch state dict of float
tensors, loadable with `torch.load(weights_only=True)`, with exactly these 31 keys:
    features.N.weight (out, in, 3, 3), features.N.bias (out,)  for N in VGG16_CONVS (torchvision's
        `vgg16().features` indices 0, 2, 5, ..., 28: the ImageNet VGG16 trunk)
    lins.K.weight (1, width_K, 1, 1)                             for K in 0..4 (lpips' calibrated lins)
Make it from the two official files (lpips' `weights/v0.1/vgg.pth` and torchvision's VGG16 checkpoint):
    python -m raygen.models.tokenizers.ae_losses convert --lpips vgg.pth --vgg vgg16-397923af.pth --out FILE

Axis letters: B batch, C image channels, H/W image sides, h/w feature-map sides, D feature width,
L the 5 LPIPS layers.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import reduce, repeat
from torch import nn

# --- PatchGAN discriminator ----------------------------------------------------------------------


def _norm(kind: str, width: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(width)
    if kind == "group":
        return nn.GroupNorm(max(d for d in range(1, 33) if width % d == 0), width)
    raise ValueError(f"PatchDiscriminator norm must be 'batch' or 'group', got {kind!r}")


class PatchDiscriminator(nn.Module):
    """pix2pix PatchGAN: (B, C, H, W) images in [-1, 1] -> (B, 1, h, w) real/fake logits per patch.

    n_layers stride-2 4x4 convs (widths ndf * min(2**n, 8)), one stride-1 conv, a 1-channel conv;
    the receptive field is 70x70 px at n_layers=3. Built with `initialize_weights(0)`.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"PatchDiscriminator n_layers must be >= 1, got {n_layers}")
        widths = [ndf * min(2 ** n, 8) for n in range(n_layers + 1)]  # conv widths, first to penultimate
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        for n in range(1, n_layers + 1):  # n == n_layers: the stride-1 block
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1, bias=False),
                       _norm(norm, widths[n]), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.initialize_weights(0)

    @torch.no_grad()
    def initialize_weights(self, seed: int) -> PatchDiscriminator:
        """The official init from a seeded generator: convs N(0, 0.02), norm scales N(1, 0.02), shifts 0.

        Officially the two conv biases keep PyTorch's default U(+-1/sqrt(fan_in)); drawn here from the seed too.
        """
        g = torch.Generator().manual_seed(seed)
        for m in self.main:
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)  # (out, in, 4, 4)
                if m.bias is not None:
                    bound = 1 / math.sqrt(m.weight[0].numel())
                    m.bias.copy_((torch.rand(m.bias.shape, generator=g) * 2 - 1) * bound)  # (out,)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.copy_(1 + torch.randn(m.weight.shape, generator=g) * 0.02)  # (width,)
                m.bias.zero_()  # (width,)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, C, H, W) -> (B, 1, h, w)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: (mean(relu(1 - real)) + mean(relu(1 + fake))) / 2 -> scalar."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator non-saturating loss: (mean(softplus(-real)) + mean(softplus(fake))) / 2 -> scalar."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The autoencoder's adversarial loss: -mean(logits_fake) -> scalar."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance: |d rec_loss / d last_layer| / (|d g_loss / d last_layer| + 1e-4), clamped to
    [0, max_weight], detached -> scalar; multiply it by the discriminator weight. Keeps both graphs."""
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)  # last_layer's shape
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)  # last_layer's shape
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, max_weight).detach()  # ()


# --- LPIPS ---------------------------------------------------------------------------------------

VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision features indices of the 13 convs
_VGG16_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (4, 9, 16, 23, 30)  # features[:4] ends at relu1_2, [:9] relu2_2, [:16] relu3_3, [:23] relu4_3, [:30] relu5_3
LIN_WIDTHS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)  # lpips' ScalingLayer: (x - shift) / scale, per RGB channel
SCALE = (0.458, 0.448, 0.450)


class Perceptual(nn.Module):
    """LPIPS-VGG16 (v0.1) distance between (B, C, H, W) images in [-1, 1] (C = 1 or 3) -> (B,).

    Frozen and always in eval mode; gradients flow to the inputs only. Random weights until loaded:
    use `Perceptual.from_file`.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 3
        for item in _VGG16_PLAN:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(width, item, 3, padding=1), nn.ReLU()]
                width = item
        self.features = nn.Sequential(*layers)  # indices as in torchvision's vgg16().features[:30]
        self.lins = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in LIN_WIDTHS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)  # (1, 3, 1, 1)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)  # (1, 3, 1, 1)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Perceptual:
        return super().train(False)  # always eval (the official lins' dropout is then the identity)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) scaled images -> 5 feature maps (N, D_l, h_l, w_l) at relu1_2 ... relu5_3."""
        taps, start = [], 0
        for end in _TAPS:
            x = self.features[start:end](x)  # (N, D_l, h_l, w_l)
            taps.append(x)
            start = end
        return taps

    def layer_distances(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) x 2 in [-1, 1] -> (B, L): each layer's term of the distance."""
        if x0.shape[0] != x1.shape[0] or x0.shape[2:] != x1.shape[2:]:
            raise ValueError(f"Perceptual inputs differ in batch or size: {tuple(x0.shape)} vs {tuple(x1.shape)}")
        x = torch.cat([_rgb(x0), _rgb(x1)])  # (2B, 3, H, W)
        x = (x - self.shift) / self.scale  # (2B, 3, H, W)
        terms = []
        for feat, lin in zip(self._taps(x), self.lins):
            feat = feat / (feat.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # (2B, D, h, w), unit over D
            f0, f1 = feat.chunk(2)  # (B, D, h, w) each
            terms.append(reduce(lin((f0 - f1) ** 2), "b 1 h w -> b", "mean"))  # (B,)
        return torch.stack(terms, 1)  # (B, L)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return self.layer_distances(x0, x1).sum(1)  # (B,)

    @classmethod
    def from_file(cls, path: str | Path) -> Perceptual:
        """Load the one weights file (see the module docstring) strictly; ValueError names what is off."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights file not found: {path} (make it with `python -m "
                                    f"raygen.models.tokenizers.ae_losses convert`)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # not a torch file, or pickled objects beyond tensors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{path}: not a readable torch state dict ({first})") from None
        model = cls()
        problems = _state_problems(state, model.state_dict())
        if problems:
            raise ValueError(f"{path}: not a Perceptual (LPIPS-VGG16) weights file: {problems}")
        model.load_state_dict(state, strict=True)
        return model

    @staticmethod
    def convert_official(lpips_state_dict: dict, vgg16_features_state_dict: dict) -> dict[str, torch.Tensor]:
        """lpips' `vgg.pth` (linK.model.1.weight; a full LPIPS state dict also works) + torchvision's VGG16
        state dict (features.N.* or a bare features N.*; classifier.* ignored) -> this class's state dict."""
        out: dict[str, torch.Tensor] = {}
        for key, t in lpips_state_dict.items():
            if m := re.fullmatch(r"lins?\.?(\d)\.model\.\d+\.weight", key):
                out[f"lins.{m[1]}.weight"] = t
            elif m := re.fullmatch(r"net\.slice\d\.(\d+)\.(weight|bias)", key):
                out[f"features.{m[1]}.{m[2]}"] = t
        for key, t in vgg16_features_state_dict.items():
            if (m := re.fullmatch(r"(?:features\.)?(\d+)\.(weight|bias)", key)) and int(m[1]) < _TAPS[-1]:
                out[f"features.{m[1]}.{m[2]}"] = t
        expected = Perceptual().state_dict()
        problems = _state_problems(out, expected)
        if problems:
            raise ValueError(f"official LPIPS/VGG16 state dicts do not convert: {problems}")
        return {k: out[k].detach().float().contiguous().clone() for k in expected}  # in this class's order


def _rgb(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"Perceptual takes (B, 1 or 3, H, W) images, got {tuple(x.shape)}")
    return repeat(x, "b 1 h w -> b 3 h w") if x.shape[1] == 1 else x  # (B, 3, H, W)


def _state_problems(state: object, expected: dict[str, torch.Tensor], show: int = 3) -> str:
    """'' if state has exactly the expected keys and shapes, else one line naming the first few problems."""
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a state dict"
    shape = lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__  # noqa: E731
    missing = [f"{k} {tuple(v.shape)}" for k, v in expected.items() if k not in state]
    unexpected = [str(k) for k in state if k not in expected]
    bad = [f"{k} {shape(state[k])} (expected {tuple(v.shape)})" for k, v in expected.items()
           if k in state and shape(state[k]) != tuple(v.shape)]
    parts = [f"{len(items)} {what}: {', '.join(items[:show])}{', ...' if len(items) > show else ''}"
             for what, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)) if items]
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m raygen.models.tokenizers.ae_losses")
    sub = ap.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="make the Perceptual weights file from the two official files")
    conv.add_argument("--lpips", required=True, help="lpips' weights/v0.1/vgg.pth")
    conv.add_argument("--vgg", required=True, help="torchvision's VGG16 checkpoint (e.g. vgg16-397923af.pth)")
    conv.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    loaded = []
    for p in (args.lpips, args.vgg):
        if not Path(p).is_file():
            raise SystemExit(f"no such file: {p}")
        loaded.append(torch.load(p, map_location="cpu", weights_only=True))
    state = Perceptual.convert_official(*loaded)
    torch.save(state, args.out)
    print(f"wrote {args.out}: {len(state)} tensors, {sum(t.numel() for t in state.values()):,} values")


if __name__ == "__main__":
    main()
