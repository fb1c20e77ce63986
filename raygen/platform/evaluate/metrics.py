"""Image-generation metrics: FID, Inception Score, precision/recall, FD-digits, reference statistics.

    mu, sigma = feature_stats(features)                      # (N, D) -> (D,), (D, D) float64
    fid = frechet_distance(mu_fake, sigma_fake, mu_real, sigma_real)
    is_mean, is_std = inception_score(logits, splits=10)     # (N, 1008) unbiased Inception logits
    precision, recall = precision_recall(real, fake, k=3)    # Kynkäänniemi et al. 2019

Feature spaces ("extractors"):
- `inception-v3-fid`: pool3 of the FID Inception (raygen.models.inception), weights from a
  local file (`eval.inception_weights` or RAYGEN_INCEPTION_WEIGHTS; never downloaded). FID, IS
  and precision/recall are computed the standard way (pytorch-fid's network and preprocessing,
  the TF Inception Score on unbiased logits).
- `digits-classifier`: the held-out digits classifier's 128-d penultimate features
  (raygen.platform.evaluate.digits). The Fréchet distance there is FD-digits: FID's formula in a feature
  space that CPU runs can afford and that needs no external weights.

A reference file (`raygen eval --make-reference DATA_DIR --out REF`) holds, per extractor, the
real images' mean and covariance, a subsample of their features (for precision/recall) and
the extractor's fingerprint, plus the images' resolution. It refuses to be compared with
images of another resolution or features of another extractor.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raygen.errors import UserError
from raygen.platform.data.shards import sha256_file

INCEPTION = "inception-v3-fid"
DIGITS = "digits-classifier"
WEIGHTS_ENV = "RAYGEN_INCEPTION_WEIGHTS"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
REFERENCE_FORMAT = 1
MAX_REFERENCE_FEATURES = 10_000  # real features a reference keeps for precision/recall


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """features (N, D) -> mean (D,) and covariance (D, D), float64, unbiased (N - 1)."""
    x = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feature statistics need an (N, D) array with N >= 2, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of
    S1^(1/2) S2 S1^(1/2): that matrix is symmetric PSD and similar to S1 S2, so the result is
    the same as with a general matrix square root (scipy.linalg.sqrtm, pytorch-fid's way) but
    stays real and stable when the covariances are singular (fewer samples than dimensions).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    root1 = _sym_sqrt(s1)
    m = root1 @ s2 @ root1  # (D, D), symmetric PSD, same spectrum as S1 S2
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    return max(fd, 0.0)  # rounding can leave -1e-12 for identical statistics


def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over `splits` contiguous chunks -> (mean, std), float64.

    `logits` (N, K) are unnormalised class scores (for IS proper, the FID Inception's unbiased
    logits). Uniform predictions give 1; confident predictions spread evenly over K classes give K.
    """
    x = torch.as_tensor(np.asarray(logits.detach().cpu() if isinstance(logits, torch.Tensor) else logits),
                        dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] < splits:
        raise ValueError(f"the Inception Score needs (N, K) logits with N >= splits={splits}, got {tuple(x.shape)}")
    log_p = torch.log_softmax(x, dim=1)  # (N, K)
    scores = []
    for chunk in torch.tensor_split(log_p, splits):
        log_py = torch.logsumexp(chunk, dim=0) - np.log(len(chunk))  # (K,) log of the marginal p(y)
        kl = (chunk.exp() * (chunk - log_py)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radii(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """(N, D) -> (N,): distance from each point to its k-th nearest other point."""
    radii = []
    for i in range(0, len(x), batch):
        d = torch.cdist(x[i : i + batch], x)  # (b, N); each row holds its own 0
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, batch: int) -> torch.Tensor:
    """(M, D), (M,), (Q, D) -> (Q,) bool: query within radius of at least one manifold point."""
    out = []
    for i in range(0, len(queries), batch):
        d = torch.cdist(queries[i : i + batch], manifold)  # (b, M)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3,
                     batch: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    Each set's manifold is the union of balls around its points with radius = distance to the
    point's k-th nearest neighbour in the same set. Precision = fraction of fake points inside
    the real manifold; recall = fraction of real points inside the fake manifold.
    """
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"precision/recall need (N, D) feature arrays of one D, got {tuple(r.shape)} and {tuple(f.shape)}")
    if min(len(r), len(f)) <= k:
        raise ValueError(f"precision/recall with k={k} need more than {k} points in each set, got {len(r)} and {len(f)}")
    precision = _inside(r, _kth_neighbour_radii(r, k, batch), f, batch).double().mean()
    recall = _inside(f, _kth_neighbour_radii(f, k, batch), r, batch).double().mean()
    return float(precision), float(recall)


# --------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------


def _how_to_provide() -> str:
    from raygen.models.inception import WEIGHTS_FILE

    return (f"FID, IS and precision/recall need pytorch-fid's FID Inception weights {WEIGHTS_FILE} as a local file "
            f"(raygen never downloads it): fetch it once from {WEIGHTS_URL} and pass eval.inception_weights=PATH "
            f"or set {WEIGHTS_ENV}=PATH")


def inception_weights_path(configured: str | None) -> tuple[Path | None, str]:
    """eval.inception_weights, else RAYGEN_INCEPTION_WEIGHTS -> (path or None, where it came from)."""
    if configured:
        return Path(configured).expanduser(), "eval.inception_weights"
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env).expanduser(), WEIGHTS_ENV
    return None, ""


def weights_missing_error(why: str) -> UserError:
    return UserError(f"{why}; {_how_to_provide()}")


@dataclass
class InceptionWeights:
    """A checked FID Inception state dict and where it came from."""

    state: dict[str, torch.Tensor]
    path: str
    sha256: str

    @property
    def fingerprint(self) -> str:
        return self.sha256[:16]

    @property
    def standard(self) -> bool:
        """The file pytorch-fid publishes (its name carries its sha256 prefix)."""
        from raygen.models.inception import WEIGHTS_SHA256_PREFIX

        return self.sha256.startswith(WEIGHTS_SHA256_PREFIX)


def load_inception_weights(configured: str | None, *, needed_by: str | None = None) -> InceptionWeights | None:
    """The configured Inception weights, checked; None when none are configured and none are needed.

    `needed_by` names what requires them (e.g. a reference with Inception statistics): then a
    missing configuration is an error too.
    """
    from raygen.models.inception import FIDInceptionV3, state_dict_problems

    path, origin = inception_weights_path(configured)
    if path is None:
        if needed_by:
            raise weights_missing_error(f"{needed_by} needs the Inception weights, and none are configured")
        return None
    if not path.is_file():
        raise weights_missing_error(f"Inception weights '{path}' (from {origin}) do not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise weights_missing_error(
            f"'{path}' (from {origin}) is not a readable PyTorch state dict ({type(e).__name__})"
        ) from None
    problems = state_dict_problems(FIDInceptionV3(), state) if isinstance(state, dict) else ["not a state dict"]
    if problems:
        raise weights_missing_error(f"'{path}' (from {origin}) is not the FID Inception-v3 state dict ({problems[0]})")
    return InceptionWeights(state, str(path), sha256_file(path))


class Extractors:
    """The feature extractors of one evaluation, rebuilt in each worker from state dicts.

    Calling it on uint8 images (B, H, W, C) returns the arrays the metrics need:
    `digits_features` (B, 128) and `digits_pred` (B,) when the digits classifier is on;
    `inception_pool` (B, 2048) and `inception_logits` (B, 1008) when Inception is on.
    """

    def __init__(self, digits_state: dict[str, torch.Tensor] | None = None,
                 inception_state: dict[str, torch.Tensor] | None = None, device: str | torch.device = "cpu",
                 inception_batch: int = 50):
        from raygen.models.classifier import DigitsClassifier
        from raygen.models.inception import FIDInceptionV3, load_weights

        self.device = torch.device(device)
        self.inception_batch = inception_batch
        self.digits = None
        if digits_state is not None:
            self.digits = DigitsClassifier()
            self.digits.load_state_dict(digits_state)
            self.digits.eval()
        self.inception = None
        if inception_state is not None:
            self.inception = load_weights(FIDInceptionV3(), inception_state).to(self.device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        from raygen.models.inception import FIDInceptionV3
        from raygen.platform.evaluate.digits import digits_features

        out: dict[str, np.ndarray] = {}
        if self.digits is not None:
            out["digits_features"], out["digits_pred"] = digits_features(self.digits, images)
        if self.inception is not None:
            pools, logits = [], []
            for i in range(0, len(images), self.inception_batch):
                x = FIDInceptionV3.preprocess(images[i : i + self.inception_batch]).to(self.device)  # (b, 3, H, W)
                p, lg = self.inception(x)
                pools.append(p.double().cpu().numpy())
                logits.append(lg.double().cpu().numpy())
            out["inception_pool"] = np.concatenate(pools) if pools else np.zeros((0, 2048))
            out["inception_logits"] = np.concatenate(logits) if logits else np.zeros((0, 1008))
        return out


FEATURE_KEY = {DIGITS: "digits_features", INCEPTION: "inception_pool"}


# --------------------------------------------------------------------------------------
# Reference statistics
# --------------------------------------------------------------------------------------


@dataclass
class Reference:
    """Real-image statistics per extractor, pinned to an image resolution and extractor weights."""

    image_size: int
    channels: int
    source: dict[str, Any]  # where the real images came from (the data set's manifest source)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> fingerprint, n, mu, sigma, features
    path: str | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def resolution(self) -> str:
        return f"{self.image_size}x{self.image_size}x{self.channels}"

    @property
    def name(self) -> str:
        return self.path or f"the real {self.source.get('name', 'images')} at {self.resolution}"

    def add(self, extractor: str, fingerprint: str, features: np.ndarray, seed: int = 0) -> None:
        mu, sigma = feature_stats(features)
        keep = features
        if len(features) > MAX_REFERENCE_FEATURES:
            idx = np.sort(np.random.default_rng(seed).choice(len(features), MAX_REFERENCE_FEATURES, replace=False))
            keep = features[idx]
        self.stats[extractor] = {"fingerprint": fingerprint, "n": int(len(features)), "mu": mu, "sigma": sigma,
                                 "features": np.asarray(keep, np.float32)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": REFERENCE_FORMAT, "image_size": self.image_size, "channels": self.channels,
                "source": self.source, "created": self.created,
                "extractors": {k: {"fingerprint": v["fingerprint"], "n": v["n"]} for k, v in self.stats.items()}}
        arrays = {"meta": np.array(json.dumps(meta))}
        for name, s in self.stats.items():
            for key in ("mu", "sigma", "features"):
                arrays[f"{name}/{key}"] = s[key]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:  # a file object: numpy adds no ".npz" to the name
            np.savez(f, **arrays)
        os.replace(tmp, path)
        self.path = str(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Reference":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"reference '{path}' does not exist; make one with `raygen eval --make-reference DATA_DIR --out {path}`")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in z.files if k != "meta"}
        except Exception as e:  # noqa: BLE001 - anything unreadable is the same user error
            raise UserError(f"'{path}' is not a raygen reference file ({type(e).__name__}: {e})") from None
        if meta.get("format") != REFERENCE_FORMAT:
            raise UserError(f"reference '{path}' has format {meta.get('format')!r}; this raygen reads {REFERENCE_FORMAT}")
        ref = cls(meta["image_size"], meta["channels"], meta["source"], path=str(path), created=meta["created"])
        for name, info in meta["extractors"].items():
            ref.stats[name] = {**info, **{k: arrays[f"{name}/{k}"] for k in ("mu", "sigma", "features")}}
        return ref

    def check_resolution(self, image_size: int, channels: int) -> None:
        if (image_size, channels) != (self.image_size, self.channels):
            raise UserError(
                f"reference '{self.name}' holds {self.resolution} images but the model makes "
                f"{image_size}x{image_size}x{channels}; statistics at another resolution are not comparable: make a "
                f"reference from a data set at the model's resolution (`raygen eval --make-reference DATA_DIR --out REF`)"
            )

    def get(self, extractor: str, fingerprint: str) -> dict[str, Any]:
        """The statistics for `extractor`, refused if they were made with other weights."""
        s = self.stats.get(extractor)
        if s is None:
            have = ", ".join(sorted(self.stats)) or "none"
            raise UserError(
                f"reference '{self.name}' has no {extractor} statistics (it has: {have}); remake it with that extractor "
                f"configured (`raygen eval --make-reference DATA_DIR --out REF`)"
            )
        if s["fingerprint"] != fingerprint:
            raise UserError(
                f"reference '{self.name}' holds {extractor} statistics from weights {s['fingerprint']}, but this "
                f"evaluation's {extractor} has weights {fingerprint}; features of another extractor are not comparable: "
                f"use the same weights, or remake the reference with these"
            )
        return s
