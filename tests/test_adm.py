"""raygen's metrics against the formulas of OpenAI's ADM evaluator (guided-diffusion/evaluations/evaluator.py),
re-implemented here independently in float64 numpy; ADM's sFID features from the FID Inception; ADM reference
batches (.npz with mu, sigma, mu_s, sigma_s, arr_0) read by metrics.Reference, and what is refused."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np
import pytest
import torch

from raygen.errors import UserError
from raygen.platform.evaluate import metrics as M

# --------------------------------------------------------------------------------------
# ADM's formulas, written independently
# --------------------------------------------------------------------------------------


def adm_fid(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 Re tr((S1 S2)^(1/2)), the square root of the NON-symmetric
    product taken through its eigenvalues (what scipy.linalg.sqrtm's trace is), not raygen's symmetric form."""
    w = np.linalg.eigvals(sigma1 @ sigma2)  # (D,) complex in general
    tr_covmean = np.sqrt(w.astype(np.complex128)).sum().real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def adm_inception_score(logits: np.ndarray, split_size: int) -> float:
    """softmax, then per chunk of split_size: exp(mean_x KL(p(y|x) || mean p(y))); the mean over chunks."""
    z = logits - logits.max(1, keepdims=True)
    preds = np.exp(z) / np.exp(z).sum(1, keepdims=True)  # (N, K)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def adm_precision_recall(ref: np.ndarray, sample: np.ndarray, k: int = 3) -> tuple[float, float]:
    """ManifoldEstimator: squared distances, radius^2 = np.partition(row incl. the 0 self-distance)[k]."""

    def sq_dist(a, b):  # (A, D), (B, D) -> (A, B)
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    def radii(x):
        return np.partition(sq_dist(x, x), k, axis=1)[:, k]  # (N,)

    r_ref, r_sample = radii(ref), radii(sample)
    precision = (sq_dist(sample, ref) <= r_ref[None, :]).any(1).mean()  # samples inside the reference manifold
    recall = (sq_dist(ref, sample) <= r_sample[None, :]).any(1).mean()  # reference points inside the samples'
    return float(precision), float(recall)


def feature_sets(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d))
    mix = np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)
    b = rng.normal(size=(n, d)) @ mix * 1.2 + 0.25  # another mean and covariance
    return a, b


# --------------------------------------------------------------------------------------
# FID / sFID
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, d", [(600, 64), (3000, 128)])
def test_frechet_distance_matches_adm_on_full_rank_covariances(n, d):
    a, b = feature_sets(n, d, seed=1)
    sa, sb = M.feature_stats(a), M.feature_stats(b)
    ours = M.frechet_distance(*sa, *sb)
    assert ours > 1.0
    assert ours == pytest.approx(adm_fid(*sa, *sb), rel=1e-8)


@pytest.mark.parametrize("n, d", [(20, 64), (10, 128)])
def test_frechet_distance_matches_adm_on_singular_covariances(n, d):
    """Fewer samples than dimensions. The product S1 S2 then has d - n + 1 zero eigenvalues that come out
    of any solver as rounding noise (~1e-16 ||S1 S2||); their square roots (~1e-8 each) make every
    sqrtm-based trace (ADM's scipy.linalg.sqrtm too) uncertain at ~1e-8 relative, hence rel=1e-6 here.
    The exact value comes from the n - 1 nonzero eigenvalues of B S2 B^T / (n - 1), B the centred
    samples in an orthonormal basis of the centred subspace (S1 = B^T B / (n - 1))."""
    a, b = feature_sets(n, d, seed=2)
    (mu1, s1), (mu2, s2) = M.feature_stats(a), M.feature_stats(b)
    assert np.linalg.matrix_rank(s1) == n - 1 < d
    ours = M.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(adm_fid(mu1, s1, mu2, s2), rel=1e-6)
    basis = np.linalg.svd(np.eye(n) - 1.0 / n)[0][:, : n - 1]  # (n, n-1), orthonormal, orthogonal to ones
    bb = basis.T @ a  # (n-1, d)
    small = bb @ s2 @ bb.T / (n - 1)  # (n-1, n-1), symmetric positive definite
    exact = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.linalg.eigvalsh(small)).sum()
    assert ours == pytest.approx(exact, rel=1e-6)


def test_frechet_distance_of_gaussians_in_closed_form():
    """Exact statistics of two Gaussians with diagonal covariances (some variances 0: singular)."""
    rng = np.random.default_rng(3)
    d = 50
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    v1[:7] = 0.0
    v2[5:12] = 0.0
    exact = ((mu1 - mu2) ** 2).sum() + v1.sum() + v2.sum() - 2 * np.sqrt(v1 * v2).sum()
    s1, s2 = np.diag(v1), np.diag(v2)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-12)
    assert adm_fid(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-12)
    # rotate both by one orthogonal matrix: the distance does not change, the matrices are no longer diagonal
    q = np.linalg.qr(rng.normal(size=(d, d)))[0]
    rot = M.frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T)
    assert rot == pytest.approx(exact, rel=1e-8)


# --------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------


def test_inception_score_matches_adm_split_size_chunks():
    rng = np.random.default_rng(4)
    pool = rng.uniform(0, 1, size=(1234, 32))  # stands in for pool_3 (non-negative, after a ReLU and a mean)
    weight = rng.normal(size=(40, 32))  # stands in for the softmax layer's weights; no bias, as ADM
    logits = pool @ weight.T  # (1234, 40)
    # chunks of 500, 500 and 234 (ADM's semantics, here with split_size=500 instead of its 5000)
    ours, _ = M.inception_score(logits, split_size=500)
    assert ours == pytest.approx(adm_inception_score(logits, 500), rel=1e-10)
    assert ours > 1.0
    # raygen's default (10 near-equal chunks) is another computation unless N = splits * split_size
    assert M.inception_score(logits, splits=10)[0] != pytest.approx(ours, rel=1e-6)
    even = logits[:1000]
    assert M.inception_score(even, splits=10)[0] == pytest.approx(adm_inception_score(even, 100), rel=1e-10)
    assert M.inception_score(even, splits=10) == M.inception_score(even, split_size=100)
    with pytest.raises(ValueError, match="split_size >= 1"):
        M.inception_score(logits, split_size=0)


# --------------------------------------------------------------------------------------
# Precision / recall
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [5, 6])
def test_precision_recall_matches_adm_manifold_estimator(seed):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(300, 16))
    sample = rng.normal(size=(250, 16)) * 1.3 + 0.4  # overlaps the reference partly
    ours = M.precision_recall(ref, sample, k=3, batch=64)
    assert ours == adm_precision_recall(ref, sample, k=3)  # exact fractions
    assert 0.0 < ours[0] < 1.0 and 0.0 < ours[1] < 1.0


def test_precision_recall_on_a_hand_built_set():
    """Points on a line (embedded in 2-D). Reference {0, 1, 2, 3, 6.5}: 3rd-neighbour radii 3, 2, 2, 3, 5.5,
    so its manifold is [-3, 12]. Samples: a cluster at 5.5..6.1 (radii .6 .5 .3 .6: manifold [4.9, 6.7]) and
    one at 20..20.5 (manifold [19.5, 21]). Precision = 4/8 (the first cluster), recall = 1/5 (6.5)."""

    def line(xs):
        return np.stack([np.asarray(xs, np.float64), np.zeros(len(xs))], 1)  # (N, 2)

    ref = line([0, 1, 2, 3, 6.5])
    sample = line([5.5, 5.6, 5.8, 6.1, 20.0, 20.2, 20.3, 20.5])
    assert adm_precision_recall(ref, sample) == (0.5, 0.2)
    assert M.precision_recall(ref, sample, k=3) == (0.5, 0.2)
    # on the boundary counts as inside (<=): reference {0, 1, 2, 3} covers [-3, 6]; -3 and 6 are in it
    ref = line([0, 1, 2, 3])
    sample = line([-3.0, 6.0, 6.01, -3.01])
    assert adm_precision_recall(ref, sample) == (0.5, 1.0)
    assert M.precision_recall(ref, sample, k=3) == (0.5, 1.0)


# --------------------------------------------------------------------------------------
# sFID features: Mixed_6d.branch1x1 (TF mixed_6/conv)
# --------------------------------------------------------------------------------------


def test_spatial_features_are_mixed_6d_branch1x1_first_7_channels_nhwc():
    from raygen.models.inception import SPATIAL_DIM, FIDInceptionV3

    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    x = FIDInceptionV3.preprocess(images)
    seen = []
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        with torch.no_grad():
            pool, logits = net(x)
            pool_s, logits_s, spatial = net(x, spatial=True)
    finally:
        hook.remove()
    assert len(seen) == 2  # branch1x1 ran once per forward, spatial or not
    b1 = seen[1]  # (2, 192, 17, 17)
    assert b1.shape == (2, 192, 17, 17) and spatial.shape == (2, SPATIAL_DIM) == (2, 2023)
    assert torch.equal(spatial, b1[:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    for b, h, w, c in [(0, 0, 0, 0), (0, 0, 0, 6), (1, 0, 1, 0), (1, 16, 3, 5), (0, 16, 16, 6)]:
        assert spatial[b, (h * 17 + w) * 7 + c] == b1[b, c, h, w]  # TF's NHWC order
    assert torch.equal(pool, pool_s) and torch.equal(logits, logits_s)  # the default outputs are unchanged
    assert torch.isfinite(spatial).all() and (spatial >= 0).all()  # after the ReLU


# --------------------------------------------------------------------------------------
# ADM reference batches
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adm_stats():
    rng = np.random.default_rng(7)
    pool = rng.normal(size=(40, 2048))
    spatial = rng.uniform(0, 2, size=(40, 2023))
    images = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    return {"mu": pool.mean(0), "sigma": np.cov(pool, rowvar=False), "mu_s": spatial.mean(0),
            "sigma_s": np.cov(spatial, rowvar=False), "arr_0": images}


@pytest.fixture(scope="module")
def eye():
    return np.eye(2048)  # a valid pool_3 covariance that compresses well (refused files are written compressed)


def write_npz(path, compressed=False, **arrays):
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def test_adm_reference_batch_loads(tmp_path, adm_stats):
    path = write_npz(tmp_path / "VIRTUAL_tiny32.npz", **adm_stats)
    ref = M.Reference.load(path)
    assert ref.kind == "adm" and ref.has_images and ref.n_images == 12
    assert (ref.image_size, ref.channels, ref.resolution) == (32, 3, "32x32x3")
    s = ref.get(M.INCEPTION, "any-weights-fingerprint")  # ADM statistics are not refused on the fingerprint
    assert s["fingerprint"] == M.ADM_FINGERPRINT == "tf-inception-2015-12-05" and s["n"] == 12
    assert "features" not in s
    for k in ("mu", "sigma", "mu_s", "sigma_s"):
        assert s[k].dtype == np.float64 and np.array_equal(s[k], adm_stats[k])
    ident = ref.identity()
    assert ident == {"name": "VIRTUAL_tiny32.npz", "path": str(path), "kind": "adm", "resolution": "32x32x3",
                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "n": {M.INCEPTION: 12}}
    assert np.array_equal(ref.real_images(), adm_stats["arr_0"])
    assert np.array_equal(ref.real_images(limit=5), adm_stats["arr_0"][:5])
    assert ref.real_images(limit=100).shape == (12, 32, 32, 3) and ref.real_images(limit=0).shape == (0, 32, 32, 3)
    ref.check_resolution(32, 3)
    with pytest.raises(UserError, match="holds 32x32x3 images but the model makes 64x64x3"):
        ref.check_resolution(64, 3)
    with pytest.raises(UserError, match="has no digits-classifier statistics .* Inception statistics only"):
        ref.get(M.DIGITS, "x")
    with pytest.raises(ValueError, match="only raygen references are saved"):
        ref.save(tmp_path / "copy.npz")


def test_adm_stats_only_file_has_unknown_resolution(tmp_path, adm_stats):
    stats = {k: v for k, v in adm_stats.items() if k != "arr_0"}
    ref = M.Reference.load(write_npz(tmp_path / "stats.npz", **stats))
    assert ref.kind == "adm" and not ref.has_images and ref.real_images() is None
    assert (ref.image_size, ref.channels, ref.resolution) == (None, None, None)
    assert ref.get(M.INCEPTION, "x")["n"] is None and ref.identity()["resolution"] is None
    ref.check_resolution(256, 3)  # nothing to compare with: not refused (the caller notes it)
    # mu/sigma only (no spatial statistics) loads too
    assert "mu_s" not in M.Reference.load(write_npz(tmp_path / "fid.npz", mu=stats["mu"],
                                                    sigma=stats["sigma"])).stats[M.INCEPTION]


def test_adm_resolution_comes_from_the_npy_header_alone(tmp_path, adm_stats, eye):
    """arr_0's (deflated) member is cut short after its header and 2 images: the file loads (nothing of arr_0
    is read), the 2 images come back, and asking for all of them says the file is truncated."""
    path = write_npz(tmp_path / "cut.npz", compressed=True, mu=adm_stats["mu"], sigma=eye)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (500, 32, 32, 3)})
    with zipfile.ZipFile(path, "a") as zf:  # 2 of 500 images
        zf.writestr("arr_0.npy", header.getvalue() + adm_stats["arr_0"][:2].tobytes(), zipfile.ZIP_DEFLATED)
    ref = M.Reference.load(path)
    assert (ref.resolution, ref.n_images) == ("32x32x3", 500)
    assert np.array_equal(ref.real_images(limit=2), adm_stats["arr_0"][:2])
    with pytest.raises(UserError, match="is truncated: arr_0 ends before image 2"):
        ref.real_images()


def _refusal(path) -> str:
    with pytest.raises(UserError) as e:
        M.Reference.load(path)
    msg = e.value.message
    assert "\n" not in msg and str(path) in msg
    return msg


def test_adm_like_files_that_are_refused(tmp_path, adm_stats, eye):
    rng = np.random.default_rng(8)
    f768 = rng.normal(size=(20, 768))
    msg = _refusal(write_npz(tmp_path / "a.npz", mu=f768.mean(0), sigma=np.cov(f768, rowvar=False)))
    assert "holds 768-d statistics (mu, sigma): not the ADM evaluator's Inception pool_3 (2048-d)" in msg
    assert "another feature extractor" in msg
    ok = {"mu": adm_stats["mu"], "sigma": eye}
    msg = _refusal(write_npz(tmp_path / "b.npz", True, **ok, mu_s=np.zeros(1000), sigma_s=np.eye(1000)))
    assert "holds 1000-d statistics (mu_s, sigma_s)" in msg and "(2023-d)" in msg
    msg = _refusal(write_npz(tmp_path / "c.npz", True, **ok, arr_0=adm_stats["arr_0"].astype(np.float32)))
    assert "arr_0 of dtype float32 and shape (12, 32, 32, 3)" in msg and "uint8 (N, H, W, 3)" in msg
    msg = _refusal(write_npz(tmp_path / "d.npz", True, **ok, arr_0=adm_stats["arr_0"][..., 0]))
    assert "arr_0 of dtype uint8 and shape (12, 32, 32)" in msg
    msg = _refusal(write_npz(tmp_path / "e.npz", True, mu=adm_stats["mu"]))
    assert "holds mu without sigma" in msg
    msg = _refusal(write_npz(tmp_path / "f.npz", True, **ok, sigma_s=np.eye(2023)))
    assert "holds sigma_s without mu_s" in msg
    msg = _refusal(write_npz(tmp_path / "g.npz", True, mu=adm_stats["mu"], sigma=eye[:, :100]))
    assert "mu of shape (2048,) and sigma of shape (2048, 100)" in msg
    msg = _refusal(write_npz(tmp_path / "h.npz", True, arr_0=adm_stats["arr_0"], arr_1=np.arange(12)))
    assert "arr_0, arr_1 but no mu and sigma: an ADM sample batch, not a reference batch" in msg
    msg = _refusal(write_npz(tmp_path / "i.npz", x=np.zeros(3), y=np.ones(2)))
    assert "neither a raygen reference" in msg and "nor an ADM evaluator reference batch" in msg
    assert "it holds: x, y" in msg
    bad = eye.copy()
    bad[0, 0] = np.nan
    assert "non-finite values in sigma" in _refusal(write_npz(tmp_path / "j.npz", True, mu=adm_stats["mu"], sigma=bad))
    np.save(tmp_path / "k.npy", np.zeros(3))  # an .npy, not an .npz
    assert "is not a raygen reference file or an ADM evaluator reference batch" in _refusal(tmp_path / "k.npy")


def test_raygen_reference_keeps_its_fingerprint_check_and_meta_wins(tmp_path):
    """A raygen file is recognised by its meta entry even next to ADM-like names; its check stays strict."""
    rng = np.random.default_rng(9)
    feats = rng.normal(size=(30, 8))
    ref = M.Reference(16, 3, {"name": "toy"})
    ref.add(M.INCEPTION, "aaaa", feats)
    ref = M.Reference.load(ref.save(tmp_path / "r.npz"))
    assert ref.kind == "raygen" and not ref.has_images and ref.real_images() is None
    with pytest.raises(UserError, match="from weights aaaa, but this evaluation's inception-v3-fid has weights bbbb"):
        ref.get(M.INCEPTION, "bbbb")
    meta = json.loads(str(np.load(tmp_path / "r.npz")["meta"]))
    assert meta["format"] == M.REFERENCE_FORMAT == 2
