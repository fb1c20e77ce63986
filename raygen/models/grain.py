"""D2iT's entropy grain map: which regions of an image get fine tokens and which get coarse ones.

D2iT (arXiv 2504.09454) encodes each S x S region of an image (S = the coarse downsampling factor:
16 at 256 px, 4 for 16 px digits) at one of two grains, and its training targets choose the grain from
the region's image entropy, as the same group's DQ-VAE code (`Entropy` / `DualGrainFixedEntropyRouter`)
computes it:

1. Gray intensity g = 0.2989 R + 0.587 G + 0.114 B on the image scaled to [-1, 1] (uint8 u -> u / 127.5 - 1);
   a 1-channel image is its own gray. The weights sum to 0.9999, so an RGB image with R = G = B has
   gray 0.9999 x, not x: its entropies differ from the 1-channel image's by far less than the gap
   between a textured and a flat region, but they are not bit-equal.
2. For each region, a Gaussian kernel density estimate of the intensity PDF at K = 32 bin centres
   b_j = linspace(-1, 1, 32):  p(b_j) proportional to sum_i exp(-(g_i - b_j)^2 / (2 sigma^2)), sigma = 0.01,
   normalised to sum 1 over the bins, and its entropy E = -sum_j p_j log p_j (natural log, 0 log 0 = 0).
   With sigma = 0.01 and bins 2/31 ~ 6.5 sigma apart the kernel is nearly a hard histogram: a flat
   region at a bin centre has E ~ 4e-8, a flat region midway between two centres E = log 2, and a
   region spread evenly over all 32 centres E = log 32 (the maximum).
3. Fine (1) where E > threshold, coarse (0) otherwise. The threshold is the (1 - r_f) quantile of the
   entropies over a training set, so a fraction r_f (the fine ratio) of the regions is fine. DQ-VAE stores
   the 99 percentiles in a JSON file and its router picks the one for r_f.

Choices marked [I] are raygen's, not the paper's or DQ-VAE's:
- [I] The quantile interpolates linearly between order statistics (torch.quantile's default); DQ-VAE
  indexes the sorted entropies at int(n * (100 - 100 r_f) // 100) without interpolation. Both leave the
  fine fraction within one region of r_f.
- [I] r_f = 0 and r_f = 1 give thresholds +inf and -inf, so the ends hold exactly even when entropies
  tie (e.g. many flat regions with E = 0, where a finite quantile would be 0 and `E > 0` misses them).
- [I] The normaliser is clamped at float's smallest normal number instead of DQ-VAE's `+ 1e-40` (a
  denormal, which flush-to-zero arithmetic would turn into 0 / 0); entropy uses torch.special.entr, so
  0 log 0 = 0 without DQ-VAE's `+ 1e-40` on p. Both change E by under 1e-36.
- [I] The KDE sums (rather than DQ-VAE's means) over the pixels; the normalisation cancels the factor.
- [I] Fine is red (255, 0, 0) and coarse blue (0, 0, 255), as in the paper's figures.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # R, G, B (DQ-VAE's `Entropy.forward`)
DEFAULT_BINS = 32
DEFAULT_SIGMA = 0.01
DEFAULT_CHUNK_ELEMS = 1 << 25  # kernel floats per chunk (128 MiB in float32)

# colour of grain value g is GRAIN_COLORS[g]: 0 = coarse (blue), 1 = fine (red)
GRAIN_COLORS: tuple[tuple[int, int, int], ...] = ((0, 0, 255), (255, 0, 0))
COARSE, FINE = 0, 1


# --- entropy -----------------------------------------------------------------------------


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, H, W, C), C in {1, 3} -> float32 gray intensity (B, H, W) in [-1, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_gray: images must be uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"to_gray: images must be (B, H, W, C) with C in {{1, 3}}, got shape {tuple(images.shape)}")
    x = images.to(torch.float32) / 127.5 - 1.0  # (B, H, W, C) in [-1, 1]
    if x.shape[-1] == 1:
        return x[..., 0]  # (B, H, W)
    r, g, b = x.unbind(-1)  # 3 x (B, H, W)
    return GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b  # (B, H, W)


def kde_entropy(values: torch.Tensor, bins: int = DEFAULT_BINS, sigma: float = DEFAULT_SIGMA) -> torch.Tensor:
    """Entropy of the Gaussian-KDE intensity PDF of each row: (..., N) values in [-1, 1] -> (...)."""
    if bins < 2 or not sigma > 0:
        raise ValueError(f"kde_entropy: need bins >= 2 and sigma > 0, got bins={bins}, sigma={sigma}")
    centres = torch.linspace(-1.0, 1.0, bins, dtype=values.dtype, device=values.device)  # (K,)
    z = (values.unsqueeze(-1) - centres) / sigma  # (..., N, K)
    pdf = torch.exp(-0.5 * z.square()).sum(-2)  # (..., K)
    norm = pdf.sum(-1, keepdim=True).clamp_min(torch.finfo(pdf.dtype).tiny)  # (..., 1); [I] no 0 / 0
    p = pdf / norm  # (..., K), each row sums to 1 (or is all 0)
    return torch.special.entr(p).sum(-1)  # (...): -sum p log p, 0 log 0 = 0


def gray_entropy(
    gray: torch.Tensor,
    region: int,
    bins: int = DEFAULT_BINS,
    sigma: float = DEFAULT_SIGMA,
    *,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> torch.Tensor:
    """Float gray images (B, H, W) in [-1, 1] -> region entropies (B, H/region, W/region), in gray's dtype.

    The kernel tensor has B * H * W * bins floats; the batch is cut into chunks of at most
    `chunk_elems` of them (at least one image per chunk).
    """
    if gray.ndim != 3 or not gray.is_floating_point():
        raise ValueError(f"gray_entropy: gray must be a float (B, H, W) tensor, got {gray.dtype} {tuple(gray.shape)}")
    if isinstance(region, bool) or not isinstance(region, int) or region < 1:
        raise ValueError(f"region must be a positive integer, got {region!r}")
    batch, height, width = gray.shape
    if height % region or width % region:
        raise ValueError(f"region {region} must divide both H={height} and W={width}")
    patches = rearrange(gray, "b (h s1) (w s2) -> b h w (s1 s2)", s1=region, s2=region)  # (B, h, w, S^2)
    per_image = height * width * bins
    step = max(1, chunk_elems // max(per_image, 1))
    if step >= batch:
        return kde_entropy(patches, bins, sigma)  # (B, h, w)
    return torch.cat([kde_entropy(patches[i : i + step], bins, sigma) for i in range(0, batch, step)])  # (B, h, w)


def region_entropy(
    images: torch.Tensor,
    region: int,
    bins: int = DEFAULT_BINS,
    sigma: float = DEFAULT_SIGMA,
    *,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> torch.Tensor:
    """uint8 images (B, H, W, C), C in {1, 3} -> float32 entropies (B, H/region, W/region).

    H and W must be multiples of `region` (S, the coarse downsampling factor).
    """
    return gray_entropy(to_gray(images), region, bins, sigma, chunk_elems=chunk_elems)


# --- threshold and grain ---------------------------------------------------------------------


def entropy_threshold(entropies: torch.Tensor, fine_ratio: float) -> float:
    """The threshold that makes a fraction `fine_ratio` of these regions fine: quantile(E, 1 - fine_ratio).

    Returns -inf for fine_ratio 1 (every region fine) and +inf for 0 (none). Sort-free (two kthvalue
    calls), so it has no torch.quantile size limit and takes a whole training set's entropies.
    """
    r = float(fine_ratio)
    if not 0.0 <= r <= 1.0:  # also rejects NaN
        raise ValueError(f"fine_ratio must lie in [0, 1], got {fine_ratio}")
    if r == 0.0:
        return math.inf
    if r == 1.0:
        return -math.inf
    flat = entropies.detach().reshape(-1).to(torch.float64).cpu()  # (n,)
    if flat.numel() == 0:
        raise ValueError("entropy_threshold: no entropies given")
    if torch.isnan(flat).any():
        raise ValueError("entropy_threshold: entropies contain NaN")
    pos = (1.0 - r) * (flat.numel() - 1)  # fractional 0-based rank, as torch.quantile 'linear'
    lo = math.floor(pos)
    hi = min(lo + 1, flat.numel() - 1)
    v_lo = flat.kthvalue(lo + 1).values.item()
    v_hi = flat.kthvalue(hi + 1).values.item() if hi != lo else v_lo
    return v_lo + (pos - lo) * (v_hi - v_lo)


def grain_map(entropies: torch.Tensor, threshold: float) -> torch.Tensor:
    """Entropies (B, h, w) -> grain (B, h, w) uint8: 1 = fine where E > threshold, 0 = coarse."""
    return (entropies > threshold).to(torch.uint8)  # (B, h, w)


# --- pictures --------------------------------------------------------------------------------


def _check_grain(grain: torch.Tensor) -> None:
    if grain.ndim < 2:
        raise ValueError(f"grain must be (..., h, w), got shape {tuple(grain.shape)}")
    if grain.numel() and not bool(((grain == COARSE) | (grain == FINE)).all()):
        raise ValueError("grain values must be 0 (coarse) or 1 (fine)")


def grain_map_image(grain: torch.Tensor, scale: int) -> torch.Tensor:
    """Grain (h, w) (or (..., h, w)) -> uint8 picture (h*scale, w*scale, 3): fine red, coarse blue."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    _check_grain(grain)
    palette = torch.tensor(GRAIN_COLORS, dtype=torch.uint8, device=grain.device)  # (2, 3)
    colours = palette[grain.long()]  # (..., h, w, 3)
    return repeat(colours, "... h w c -> ... (h s1) (w s2) c", s1=scale, s2=scale)  # (..., h*scale, w*scale, 3)


def overlay(image: torch.Tensor, grain: torch.Tensor, alpha: float = 0.4) -> torch.Tensor:
    """Blend the grain colours over a uint8 image (H, W, C), C in {1, 3} -> uint8 (H, W, 3).

    out = round((1 - alpha) * image + alpha * colour); grain is (h, w) with H = h * S and W = w * S.
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        got = f"{image.dtype} {tuple(image.shape)}"
        raise ValueError(f"overlay: image must be uint8 (H, W, C) with C in {{1, 3}}, got {got}")
    if grain.ndim != 2:
        raise ValueError(f"overlay: grain must be (h, w), got shape {tuple(grain.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha must lie in [0, 1], got {alpha}")
    (height, width, _), (h, w) = image.shape, grain.shape
    if h == 0 or w == 0 or height % h or width % w or height // h != width // w:
        raise ValueError(f"overlay: image {height}x{width} is not grain {h}x{w} times one square region size")
    colours = grain_map_image(grain, height // h).to(torch.float32)  # (H, W, 3)
    base = image.to(torch.float32).expand(height, width, 3)  # (H, W, 3); a gray image repeats its channel
    out = (1.0 - alpha) * base + alpha * colours  # (H, W, 3)
    return out.round().clamp(0, 255).to(torch.uint8)  # (H, W, 3)
