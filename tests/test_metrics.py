"""Metrics against independent computations: FID (scipy.linalg.sqrtm), IS, precision/recall, FD-digits,
the FID Inception network's state dict, the weights' errors and the reference file's refusals."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from raygen.errors import UserError
from raygen.platform.evaluate import metrics as M


def fid_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's formula, written independently: np.cov + scipy.linalg.sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def two_sets(n=600, d=64, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d))
    mix = np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)
    b = rng.normal(size=(n, d)) @ mix * 1.2 + 0.25  # another covariance and mean
    return a, b


# --------------------------------------------------------------------------------------
# FID / Fréchet distance
# --------------------------------------------------------------------------------------


def test_frechet_distance_of_a_set_against_itself_is_zero():
    a, _ = two_sets()
    stats = M.feature_stats(a)
    assert M.frechet_distance(*stats, *stats) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_scipy_sqrtm_on_fixed_feature_sets():
    a, b = two_sets()
    ours = M.frechet_distance(*M.feature_stats(a), *M.feature_stats(b))
    ref = fid_scipy(a, b)
    assert ours > 1.0  # the sets do differ
    assert ours == pytest.approx(ref, abs=1e-3)
    # symmetric, and a shift of the mean adds exactly its squared norm
    assert M.frechet_distance(*M.feature_stats(b), *M.feature_stats(a)) == pytest.approx(ours, abs=1e-6)
    mu, s = M.feature_stats(a)
    assert M.frechet_distance(mu, s, mu + 0.5, s) == pytest.approx(0.25 * a.shape[1], abs=1e-6)


def test_fd_digits_matches_scipy_on_fixed_image_sets(digits_clf):
    """Two fixed image sets (the real digits' test and train splits) through the digits features."""
    from raygen.platform.evaluate.digits import digits_features, digits_split

    d = digits_split()
    fa, _ = digits_features(digits_clf, torch.from_numpy(d["test_x"]))
    fb, _ = digits_features(digits_clf, torch.from_numpy(d["train_x"]))
    ours = M.frechet_distance(*M.feature_stats(fa), *M.feature_stats(fb))
    assert ours == pytest.approx(fid_scipy(fa, fb), abs=1e-3)


def test_feature_stats_need_two_samples():
    with pytest.raises(ValueError, match="N >= 2"):
        M.feature_stats(np.zeros((1, 4)))


# --------------------------------------------------------------------------------------
# Inception Score, precision/recall
# --------------------------------------------------------------------------------------


def test_inception_score_uniform_is_one_and_confident_is_the_class_count():
    n, k = 1000, 10
    mean, std = M.inception_score(np.zeros((n, k)), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    confident = np.full((n, k), -30.0)
    confident[np.arange(n), np.arange(n) % k] = 30.0  # every class equally often, each image certain
    mean, _ = M.inception_score(confident, splits=10)
    assert mean == pytest.approx(k, rel=1e-6)
    # collapsed onto one class: certain but not diverse
    one = np.full((n, k), -30.0)
    one[:, 3] = 30.0
    assert M.inception_score(one, splits=10)[0] == pytest.approx(1.0, abs=1e-6)


def test_precision_recall_sanity():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(500, 8))
    same = rng.normal(size=(500, 8))
    p, r = M.precision_recall(real, same, k=3)
    assert p > 0.8 and r > 0.8
    far = rng.normal(size=(500, 8)) + 50.0
    assert M.precision_recall(real, far, k=3) == (0.0, 0.0)
    # mode collapse: fakes all near one real point -> precise, but they cover little of the real set
    collapsed = real[0] + 0.01 * rng.normal(size=(500, 8))
    p, r = M.precision_recall(real, collapsed, k=3)
    assert p > 0.95 and r < 0.05
    with pytest.raises(ValueError, match="more than 3 points"):
        M.precision_recall(real[:3], same, k=3)


# --------------------------------------------------------------------------------------
# FD-digits
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_clf():
    """The held-out digits classifier, trained for 4 of its 12 epochs (seconds instead of a minute)."""
    from raygen.platform.evaluate.digits import train_classifier

    clf, acc = train_classifier(epochs=4)
    assert acc > 0.9
    return clf


def test_fd_digits_separates_real_digits_from_noise(digits_clf):
    from raygen.platform.evaluate.digits import digits_features, digits_split

    d = digits_split()
    real_ref = M.feature_stats(digits_features(digits_clf, torch.from_numpy(d["train_x"]))[0])
    real, pred = digits_features(digits_clf, torch.from_numpy(d["test_x"]))
    noise_images = torch.randint(0, 256, d["test_x"].shape, generator=torch.Generator().manual_seed(0),
                                 dtype=torch.uint8)
    noise, _ = digits_features(digits_clf, noise_images)
    fd_real = M.frechet_distance(*M.feature_stats(real), *real_ref)
    fd_noise = M.frechet_distance(*M.feature_stats(noise), *real_ref)
    assert (pred == d["test_y"]).mean() > 0.9
    assert fd_noise > 20 * fd_real, (fd_real, fd_noise)


def test_digits_features_are_the_classifiers_penultimate_layer(digits_clf):
    from raygen.models.classifier import to_input
    from raygen.platform.evaluate.digits import class_accuracy, digits_features, digits_split

    d = digits_split()
    images, labels = torch.from_numpy(d["test_x"][:50]), torch.from_numpy(d["test_y"][:50])
    feats, pred = digits_features(digits_clf, images, batch_size=16)
    with torch.no_grad():
        logits = digits_clf(to_input(images))
    assert feats.shape == (50, 128) and feats.dtype == np.float64
    assert np.array_equal(pred, logits.argmax(1).numpy())
    assert class_accuracy(digits_clf, images, labels) == pytest.approx((pred == d["test_y"][:50]).mean())


# --------------------------------------------------------------------------------------
# The FID Inception network and its weights
# --------------------------------------------------------------------------------------


def test_fid_inception_state_dict_matches_the_pytorch_fid_file_layout():
    from raygen.models.inception import FIDInceptionV3

    net = FIDInceptionV3()
    sd = net.state_dict()
    # torchvision's Inception3 (27,161,264 params) without the aux head (3,326,696) and with
    # 1008 classes instead of 1000 (+16,392): the network pytorch-fid loads the file into.
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    assert len(sd) == 566 and not any(k.startswith("AuxLogits") for k in sd)
    expect = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_var": (32,),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6e.branch7x7_2.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    assert {k: tuple(sd[k].shape) for k in expect} == expect
    # the FID quirks: TF-style average pools, and a max pool in the last block
    assert net.Mixed_7b.pool == "avg" and net.Mixed_7c.pool == "max"


def test_fid_inception_forward_on_random_init_gives_2048_d_features():
    from raygen.models.inception import FIDInceptionV3

    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    images = torch.randint(0, 256, (2, 8, 8, 1), dtype=torch.uint8)  # small grey images, resized to 299
    with torch.no_grad():
        pool, logits = net(FIDInceptionV3.preprocess(images))
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(pool).all() and (pool >= 0).all()  # after a ReLU and an average
    assert torch.allclose(logits, pool @ net.fc.weight.t())


def test_inception_weights_load_from_a_local_file_with_weights_only(tmp_path):
    from raygen.models.inception import FIDInceptionV3

    torch.manual_seed(0)
    sd = FIDInceptionV3().state_dict()
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, path)
    w = M.load_inception_weights(str(path))
    assert w is not None and len(w.fingerprint) == 16 and not w.standard  # random weights, not the release
    # an older save without BatchNorm's counters loads too
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, tmp_path / "old.pth")
    assert M.load_inception_weights(str(tmp_path / "old.pth")) is not None
    ext = M.Extractors(inception_state=w.state)
    out = ext(torch.zeros(3, 8, 8, 3, dtype=torch.uint8))
    assert out["inception_pool"].shape == (3, 2048) and out["inception_logits"].shape == (3, 1008)
    assert out["inception_spatial"].shape == (3, 2023) and out["inception_spatial"].dtype == np.float64


def test_missing_or_wrong_inception_weights_say_how_to_provide_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(M.WEIGHTS_ENV, raising=False)
    assert M.load_inception_weights(None) is None  # nothing configured, nothing needed: no Inception metrics

    def check(exc, origin):
        msg = exc.value.message
        assert "\n" not in msg
        for part in ("pt_inception-2015-12-05-6726825d.pth", "eval.inception_weights=PATH", "RAYGEN_INCEPTION_WEIGHTS=PATH",
                     "never downloads", origin):
            assert part in msg, (part, msg)

    with pytest.raises(UserError) as e:
        M.load_inception_weights(str(tmp_path / "nope.pth"))
    check(e, "from eval.inception_weights")
    monkeypatch.setenv(M.WEIGHTS_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(UserError) as e:
        M.load_inception_weights(None)
    check(e, "from RAYGEN_INCEPTION_WEIGHTS")
    monkeypatch.delenv(M.WEIGHTS_ENV)
    with pytest.raises(UserError) as e:
        M.load_inception_weights(None, needed_by="reference 'r.npz'")
    check(e, "reference 'r.npz' needs the Inception weights")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(UserError) as e:
        M.load_inception_weights(str(tmp_path / "junk.pth"))
    check(e, "not a readable PyTorch state dict")
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, tmp_path / "other.pth")
    with pytest.raises(UserError) as e:
        M.load_inception_weights(str(tmp_path / "other.pth"))
    check(e, "is not the FID Inception-v3 state dict")


# --------------------------------------------------------------------------------------
# Reference statistics
# --------------------------------------------------------------------------------------


def test_reference_round_trip_and_refusals(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 16))
    ref = M.Reference(8, 1, {"name": "digits"})
    ref.add(M.DIGITS, "aaaa", feats)
    path = ref.save(tmp_path / "ref")  # no suffix added
    assert path == tmp_path / "ref" and path.is_file()
    back = M.Reference.load(path)
    s = back.get(M.DIGITS, "aaaa")
    mu, sigma = M.feature_stats(feats)
    assert s["n"] == 50 and np.allclose(s["mu"], mu) and np.allclose(s["sigma"], sigma)
    back.check_resolution(8, 1)
    with pytest.raises(UserError, match=r"holds 8x8x1 images but the model makes 16x16x1"):
        back.check_resolution(16, 1)
    with pytest.raises(UserError, match=r"holds 8x8x1 images but the model makes 8x8x3"):
        back.check_resolution(8, 3)
    with pytest.raises(UserError, match="from weights aaaa, but this evaluation's digits-classifier has weights bbbb"):
        back.get(M.DIGITS, "bbbb")
    with pytest.raises(UserError, match="has no inception-v3-fid statistics"):
        back.get(M.INCEPTION, "aaaa")
    (tmp_path / "bad.npz").write_text("nope")
    with pytest.raises(UserError, match="is not a raygen reference file"):
        M.Reference.load(tmp_path / "bad.npz")
    with pytest.raises(UserError, match="does not exist; make one with `raygen eval --make-reference"):
        M.Reference.load(tmp_path / "missing.npz")


def test_reference_with_spatial_statistics_round_trips_as_format_2(tmp_path):
    import hashlib
    import json

    rng = np.random.default_rng(1)
    feats, spatial = rng.normal(size=(40, 16)), rng.uniform(0, 1, size=(40, 12))
    ref = M.Reference(32, 3, {"name": "toy"})
    ref.add(M.INCEPTION, "aaaa", feats, spatial=spatial)
    ref.add(M.DIGITS, "dddd", feats[:, :8])  # no spatial statistics for this one
    path = ref.save(tmp_path / "ref.npz")
    assert json.loads(str(np.load(path)["meta"]))["format"] == M.REFERENCE_FORMAT == 2
    back = M.Reference.load(path)
    s = back.get(M.INCEPTION, "aaaa")
    mu_s, sigma_s = M.feature_stats(spatial)
    assert np.array_equal(s["mu_s"], mu_s) and np.array_equal(s["sigma_s"], sigma_s) and s["features"].shape == (40, 16)
    assert "mu_s" not in back.get(M.DIGITS, "dddd")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert back.identity() == {"name": "ref.npz", "path": str(path), "sha256": digest, "kind": "raygen",
                               "resolution": "32x32x3", "n": {M.INCEPTION: 40, M.DIGITS: 40}}
    # a format-2 entry may come without features (FID only)
    del ref.stats[M.DIGITS]["features"]
    assert "features" not in M.Reference.load(ref.save(tmp_path / "nofeat.npz")).get(M.DIGITS, "dddd")
    with pytest.raises(ValueError, match="spatial features of 39 images for 40 images' features"):
        ref.add(M.INCEPTION, "aaaa", feats, spatial=spatial[:39])


def test_reference_format_1_files_still_load(tmp_path):
    """A file in the format-1 layout, written by hand: meta + {extractor}/mu, /sigma, /features."""
    import json

    rng = np.random.default_rng(2)
    feats = rng.normal(size=(25, 6))
    mu, sigma = M.feature_stats(feats)
    meta = {"format": 1, "image_size": 8, "channels": 1, "source": {"name": "digits"},
            "created": "2025-01-01T00:00:00Z", "extractors": {M.DIGITS: {"fingerprint": "ffff", "n": 25}}}
    path = tmp_path / "old.npz"
    np.savez(path, meta=np.array(json.dumps(meta)), **{f"{M.DIGITS}/mu": mu, f"{M.DIGITS}/sigma": sigma,
                                                        f"{M.DIGITS}/features": feats.astype(np.float32)})
    ref = M.Reference.load(path)
    s = ref.get(M.DIGITS, "ffff")
    assert ref.kind == "raygen" and ref.resolution == "8x8x1" and ref.created == "2025-01-01T00:00:00Z"
    assert np.array_equal(s["mu"], mu) and np.array_equal(s["sigma"], sigma) and s["features"].shape == (25, 6)
    assert "mu_s" not in s and len(ref.sha256) == 64
    meta["format"] = 3
    np.savez(tmp_path / "new.npz", meta=np.array(json.dumps(meta)),
             **{f"{M.DIGITS}/mu": mu, f"{M.DIGITS}/sigma": sigma})
    with pytest.raises(UserError, match="has format 3; this raygen reads formats 1, 2"):
        M.Reference.load(tmp_path / "new.npz")


def test_mfu_is_logged_only_with_a_known_gpu_peak(monkeypatch):
    from raygen.platform.devices import peak_flops as _peak_flops

    assert _peak_flops(torch.device("cpu"), "fp32") is None  # CPU: no perf/mfu
    # No GPU here: the name lookup is exercised with the names CUDA reports for these cards.
    for name, precision, tflops in [("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.0),
                                    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5), ("NVIDIA GeForce GTX 1080", "bf16", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        got = _peak_flops(torch.device("cuda", 0), precision)
        assert got == (tflops * 1e12 if tflops else None), name
    monkeypatch.setenv("RAYGEN_PEAK_TFLOPS", "100")
    assert _peak_flops(torch.device("cuda", 0), "bf16") == 100e12
