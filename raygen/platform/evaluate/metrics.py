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
the extractor's fingerprint, plus the images' resolution; since format 2 the Inception entry may
also hold the spatial statistics (`mu_s`, `sigma_s`, sFID). It refuses to be compared with
images of another resolution or features of another extractor.

`Reference.load` also reads the reference batches of OpenAI's ADM evaluator
(guided-diffusion/evaluations/evaluator.py; e.g. VIRTUAL_imagenet256_labeled.npz), the ones
papers report against: an .npz with `mu` (2048,), `sigma` (2048, 2048) of Inception pool_3,
`mu_s` (2023,), `sigma_s` (2023, 2023) of the spatial features (see raygen.models.inception)
and the real images `arr_0` uint8 (N, H, W, 3). Such a Reference has `kind == "adm"` and no
`features`: precision/recall need the caller to run Inception on `real_images()`.

Against ADM's formulas (tests/test_adm.py): FID and sFID are the same Fréchet distance (ADM
uses scipy.linalg.sqrtm of S1 S2; this module a symmetric equivalent); the Inception Score is
the same with `split_size=5000` (ADM's chunks), which equals `splits=10` at N = 50,000; for
precision/recall ADM compares squared distances computed in float16 (float32 if that
overflows), this module Euclidean distances in float64 — the same comparisons in exact
arithmetic, so the two can differ only for points within float16 rounding of a radius.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
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
REFERENCE_FORMAT = 2  # 2: the Inception entry may hold spatial statistics (mu_s, sigma_s); features optional
READ_FORMATS = (1, 2)
ADM_FINGERPRINT = "tf-inception-2015-12-05"  # the TF graph of ADM's evaluator (pytorch-fid's weights are its port)
ADM_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "arr_0")
ENTRY_ARRAYS = ("mu", "sigma", "features", "mu_s", "sigma_s")  # what a reference entry may hold
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


def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10,
                    split_size: int | None = None) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over `splits` contiguous chunks -> (mean, std), float64.

    `logits` (N, K) are unnormalised class scores (for IS proper, the FID Inception's unbiased
    logits). Uniform predictions give 1; confident predictions spread evenly over K classes give K.
    With `split_size` (ADM's evaluator uses 5000), the chunks are of that many images instead, the
    last one holding the rest, and `splits` is ignored: at N = splits * split_size both agree.
    """
    x = torch.as_tensor(np.asarray(logits.detach().cpu() if isinstance(logits, torch.Tensor) else logits),
                        dtype=torch.float64)
    if split_size is not None:
        if x.ndim != 2 or x.shape[0] < 1 or split_size < 1:
            raise ValueError(f"the Inception Score needs (N, K) logits with N >= 1 and split_size >= 1, "
                             f"got {tuple(x.shape)} and split_size={split_size}")
    elif x.ndim != 2 or x.shape[0] < splits:
        raise ValueError(f"the Inception Score needs (N, K) logits with N >= splits={splits}, got {tuple(x.shape)}")
    log_p = torch.log_softmax(x, dim=1)  # (N, K)
    scores = []
    chunks = torch.split(log_p, split_size) if split_size is not None else torch.tensor_split(log_p, splits)
    for chunk in chunks:
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
    ADM's ManifoldEstimator (k=3) is the same rule on squared distances computed in float16; here
    they are float64 distances (see the module docstring).
    """
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"precision/recall need (N, D) feature arrays of one D, "
                         f"got {tuple(r.shape)} and {tuple(f.shape)}")
    if min(len(r), len(f)) <= k:
        raise ValueError(f"precision/recall with k={k} need more than {k} points in each set, "
                         f"got {len(r)} and {len(f)}")
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
    `inception_pool` (B, 2048), `inception_logits` (B, 1008) and `inception_spatial` (B, 2023, ADM's
    sFID features) when Inception is on.
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
        from raygen.models.inception import NUM_CLASSES, POOL_DIM, SPATIAL_DIM, FIDInceptionV3
        from raygen.platform.evaluate.digits import digits_features

        out: dict[str, np.ndarray] = {}
        if self.digits is not None:
            out["digits_features"], out["digits_pred"] = digits_features(self.digits, images)
        if self.inception is not None:
            pools, logits, spatial = [], [], []
            for i in range(0, len(images), self.inception_batch):
                x = FIDInceptionV3.preprocess(images[i : i + self.inception_batch]).to(self.device)  # (b, 3, H, W)
                p, lg, sp = self.inception(x, spatial=True)  # (b, 2048), (b, 1008), (b, 2023)
                pools.append(p.double().cpu().numpy())
                logits.append(lg.double().cpu().numpy())
                spatial.append(sp.double().cpu().numpy())
            out["inception_pool"] = np.concatenate(pools) if pools else np.zeros((0, POOL_DIM))
            out["inception_logits"] = np.concatenate(logits) if logits else np.zeros((0, NUM_CLASSES))
            out["inception_spatial"] = np.concatenate(spatial) if spatial else np.zeros((0, SPATIAL_DIM))
        return out


FEATURE_KEY = {DIGITS: "digits_features", INCEPTION: "inception_pool"}


# --------------------------------------------------------------------------------------
# Reference statistics
# --------------------------------------------------------------------------------------


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """An open .npy stream -> (shape, fortran_order, dtype), reading the header only."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)  # 2.0 and 3.0 share the layout (3.0: utf-8 names)


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """key -> (shape, dtype) of every array of an .npz, from the npy headers (no array is loaded)."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.filename.endswith(".npy"):
                with zf.open(info) as f:
                    shape, _, dtype = _read_npy_header(f)
                out[info.filename[: -len(".npy")]] = (tuple(shape), dtype)
    return out


@dataclass
class Reference:
    """Real-image statistics per extractor, pinned to an image resolution and extractor weights.

    `kind` is "raygen" (made by `raygen eval --make-reference`) or "adm" (an ADM evaluator reference
    batch, see the module docstring: Inception statistics only, fingerprint ADM_FINGERPRINT, no
    `features`, the real images in the file; image_size and channels are None when it has none).
    """

    image_size: int | None
    channels: int | None
    source: dict[str, Any]  # where the real images came from (the data set's manifest source)
    # name -> fingerprint, n, mu, sigma[, features][, mu_s, sigma_s]
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: str | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    kind: str = "raygen"
    n_images: int | None = None  # how many real images the file holds (ADM's arr_0); None: none
    _sha256: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str | None:
        """Of the file, once saved or loaded; hashed on first use (a 2 GB ADM batch takes seconds)."""
        if self._sha256 is None and self.path is not None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    @property
    def resolution(self) -> str | None:
        if self.image_size is None or self.channels is None:
            return None
        return f"{self.image_size}x{self.image_size}x{self.channels}"

    @property
    def name(self) -> str:
        return self.path or f"the real {self.source.get('name', 'images')} at {self.resolution}"

    @property
    def has_images(self) -> bool:
        """Whether real_images() has images to give (an ADM reference batch with arr_0)."""
        return self.n_images is not None

    def identity(self) -> dict[str, Any]:
        """What a result records about the reference it was scored against."""
        return {"name": Path(self.path).name if self.path else self.name, "path": self.path, "sha256": self.sha256,
                "kind": self.kind, "resolution": self.resolution,
                "n": {k: v.get("n") for k, v in self.stats.items()}}

    def add(self, extractor: str, fingerprint: str, features: np.ndarray, seed: int = 0,
            spatial: np.ndarray | None = None) -> None:
        """Statistics of `features` (N, D) (and of `spatial` (N, 2023), the same images' sFID features)."""
        mu, sigma = feature_stats(features)
        keep = features
        if len(features) > MAX_REFERENCE_FEATURES:
            idx = np.sort(np.random.default_rng(seed).choice(len(features), MAX_REFERENCE_FEATURES, replace=False))
            keep = features[idx]
        entry = {"fingerprint": fingerprint, "n": int(len(features)), "mu": mu, "sigma": sigma,
                 "features": np.asarray(keep, np.float32)}
        if spatial is not None:
            if len(spatial) != len(features):
                raise ValueError(f"spatial features of {len(spatial)} images for {len(features)} images' features")
            entry["mu_s"], entry["sigma_s"] = feature_stats(spatial)
        self.stats[extractor] = entry

    def save(self, path: str | Path) -> Path:
        if self.kind != "raygen":
            raise ValueError(f"a {self.kind} reference is used as its file is; only raygen references are saved")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": REFERENCE_FORMAT, "image_size": self.image_size, "channels": self.channels,
                "source": self.source, "created": self.created,
                "extractors": {k: {"fingerprint": v["fingerprint"], "n": v["n"]} for k, v in self.stats.items()}}
        arrays = {"meta": np.array(json.dumps(meta))}
        for name, s in self.stats.items():
            for key in ENTRY_ARRAYS:
                if key in s:
                    arrays[f"{name}/{key}"] = s[key]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:  # a file object: numpy adds no ".npz" to the name
            np.savez(f, **arrays)
        os.replace(tmp, path)
        self.path, self._sha256 = str(path), None
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Reference":
        """A raygen reference file or an ADM evaluator reference batch; refuses anything else in one line."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"reference '{path}' does not exist; make one with "
                            f"`raygen eval --make-reference DATA_DIR --out {path}`")
        try:
            headers = _npz_headers(path)
        except Exception as e:  # noqa: BLE001 - anything unreadable is the same user error
            raise UserError(f"'{path}' is not a raygen reference file or an ADM evaluator reference batch "
                            f"(both are .npz files; {type(e).__name__}: {e})") from None
        if "meta" in headers:
            ref = cls._load_raygen(path)
        elif any(k in headers for k in ADM_KEYS):
            ref = cls._load_adm(path, headers)
        else:
            have = ", ".join(sorted(headers)) or "no arrays"
            raise UserError(f"'{path}' is neither a raygen reference (an .npz with a 'meta' entry) nor an ADM "
                            f"evaluator reference batch (mu, sigma, mu_s, sigma_s, arr_0); it holds: {have}")
        return ref

    @classmethod
    def _load_raygen(cls, path: Path) -> "Reference":
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in z.files if k != "meta"}
        except Exception as e:  # noqa: BLE001 - anything unreadable is the same user error
            raise UserError(f"'{path}' is not a raygen reference file ({type(e).__name__}: {e})") from None
        if not isinstance(meta, dict) or meta.get("format") not in READ_FORMATS:
            got = meta.get("format") if isinstance(meta, dict) else None
            raise UserError(f"reference '{path}' has format {got!r}; this raygen reads formats "
                            f"{', '.join(map(str, READ_FORMATS))}")
        ref = cls(meta["image_size"], meta["channels"], meta["source"], path=str(path), created=meta["created"])
        for name, info in meta["extractors"].items():
            entry = {**info, **{k: arrays[f"{name}/{k}"] for k in ENTRY_ARRAYS if f"{name}/{k}" in arrays}}
            missing = [k for k in ("mu", "sigma") if k not in entry]
            if missing:
                raise UserError(f"reference '{path}' lacks {' and '.join(missing)} of its {name} statistics; "
                                f"remake it (`raygen eval --make-reference DATA_DIR --out REF`)")
            ref.stats[name] = entry
        return ref

    @classmethod
    def _load_adm(cls, path: Path, headers: dict[str, tuple[tuple[int, ...], np.dtype]]) -> "Reference":
        from raygen.models.inception import POOL_DIM, SPATIAL_DIM

        what = f"ADM reference batch '{path}'"
        for a, b in (("mu", "sigma"), ("mu_s", "sigma_s")):
            if (a in headers) != (b in headers):
                have, lack = (a, b) if a in headers else (b, a)
                raise UserError(f"{what} holds {have} without {lack}; a reference batch holds both")
        if "mu" not in headers:
            raise UserError(f"'{path}' holds {', '.join(sorted(headers))} but no mu and sigma: an ADM sample batch, "
                            f"not a reference batch (mu, sigma, mu_s, sigma_s, arr_0)")
        for a, b, dim, space in (("mu", "sigma", POOL_DIM, "Inception pool_3"),
                                 ("mu_s", "sigma_s", SPATIAL_DIM, "spatial features (mixed_6/conv, 17x17x7)")):
            if a not in headers:
                continue
            (sa, da), (sb, db) = headers[a], headers[b]
            if len(sa) != 1 or sb != (sa[0], sa[0]):
                raise UserError(f"{what} has {a} of shape {sa} and {b} of shape {sb}; "
                                f"expected ({dim},) and ({dim}, {dim})")
            if sa[0] != dim:
                raise UserError(f"{what} holds {sa[0]}-d statistics ({a}, {b}): not the ADM evaluator's {space} "
                                f"({dim}-d) — another feature extractor")
            if da.kind != "f" or db.kind != "f":
                raise UserError(f"{what} has {a} of dtype {da} and {b} of dtype {db}; expected floating point")
        size = channels = n = None
        if "arr_0" in headers:
            shape, dtype = headers["arr_0"]
            if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or shape[0] < 1:
                raise UserError(f"{what} has arr_0 of dtype {dtype} and shape {shape}; expected the real images as "
                                f"uint8 (N, H, W, 3) with N >= 1 and H == W")
            n, size, channels = int(shape[0]), int(shape[1]), 3
        entry: dict[str, Any] = {"fingerprint": ADM_FINGERPRINT, "n": n}
        with np.load(path, allow_pickle=False) as z:
            for k in ("mu", "sigma", "mu_s", "sigma_s"):
                if k in headers:
                    entry[k] = np.asarray(z[k], np.float64)
                    if not np.isfinite(entry[k]).all():
                        raise UserError(f"{what} has non-finite values in {k}")
        source = {"name": path.name, "format": "adm", "keys": sorted(headers)}
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))
        return cls(size, channels, source, {INCEPTION: entry}, path=str(path), created=created, kind="adm",
                   n_images=n)

    def real_images(self, limit: int | None = None) -> np.ndarray | None:
        """The file's real images, uint8 (N, H, W, 3) (the first `limit` of them); None when it holds none."""
        if not self.has_images:
            return None
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            shape, fortran, dtype = _read_npy_header(f)
            n = shape[0] if limit is None else min(limit, shape[0])
            if fortran:  # not what numpy writes by default: load it whole
                return np.ascontiguousarray(np.load(self.path, allow_pickle=False)["arr_0"][:n])
            out = np.empty((n, *shape[1:]), np.uint8)  # (n, H, W, 3)
            per = int(np.prod(shape[1:]))
            for i in range(0, n, 256):  # in chunks: no second full-size copy
                j = min(i + 256, n)
                buf = f.read((j - i) * per)
                if len(buf) != (j - i) * per:
                    raise UserError(f"reference '{self.path}' is truncated: arr_0 ends before image "
                                    f"{i + len(buf) // per}")
                out[i:j] = np.frombuffer(buf, np.uint8).reshape(j - i, *shape[1:])
        return out

    def check_resolution(self, image_size: int, channels: int) -> None:
        """Refuse a model of another resolution; a reference without images (ADM stats only) refuses nothing."""
        if self.image_size is None:
            return
        if (image_size, channels) != (self.image_size, self.channels):
            raise UserError(
                f"reference '{self.name}' holds {self.resolution} images but the model makes "
                f"{image_size}x{image_size}x{channels}; statistics at another resolution are not comparable: make a "
                f"reference from a data set at the model's resolution "
                f"(`raygen eval --make-reference DATA_DIR --out REF`)"
            )

    def get(self, extractor: str, fingerprint: str) -> dict[str, Any]:
        """The statistics for `extractor`, refused if they were made with other weights.

        ADM reference batches are not refused on the fingerprint (their statistics come from the TF
        graph; the caller notes comparability).
        """
        s = self.stats.get(extractor)
        if s is None:
            have = ", ".join(sorted(self.stats)) or "none"
            how = ("an ADM reference batch holds Inception statistics only" if self.kind == "adm" else
                   "remake it with that extractor configured (`raygen eval --make-reference DATA_DIR --out REF`)")
            raise UserError(f"reference '{self.name}' has no {extractor} statistics (it has: {have}); {how}")
        if self.kind == "raygen" and s["fingerprint"] != fingerprint:
            raise UserError(
                f"reference '{self.name}' holds {extractor} statistics from weights {s['fingerprint']}, but this "
                f"evaluation's {extractor} has weights {fingerprint}; features of another extractor are not "
                f"comparable: use the same weights, or remake the reference with these"
            )
        return s
