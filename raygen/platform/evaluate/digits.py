"""The held-out digits classifier: trained once on a train split of the real digits, cached.

It judges generated digits: `eval/class_acc` is the fraction of samples it labels as the
class they were asked for. Training takes a few seconds on a CPU; the weights are cached
under <workdir>/cache and loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raygen.models.classifier import DigitsClassifier, to_input

CACHE_NAME = "digits_classifier.pt"
VERSION = 1


def digits_split(seed: int = 0) -> dict[str, np.ndarray]:
    """The real digits as uint8 (N, 8, 8, 1), split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    order = np.random.default_rng(seed).permutation(len(images))
    cut = int(0.8 * len(images))
    tr, te = order[:cut], order[cut:]
    return {"train_x": images[tr], "train_y": d.target[tr], "test_x": images[te], "test_y": d.target[te]}


def train_classifier(epochs: int = 12, seed: int = 0) -> tuple[DigitsClassifier, float]:
    # Batches of 64 tiny images: more threads only spin, 4-7x slower on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_classifier(epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train_classifier(epochs: int, seed: int) -> tuple[DigitsClassifier, float]:
    torch.manual_seed(seed)
    data = digits_split(seed)
    x = to_input(torch.from_numpy(data["train_x"]))
    y = torch.from_numpy(data["train_y"]).long()
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            xb = x[idx]
            # small random shifts make the judge robust to generated digits that sit off-centre
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(to_input(torch.from_numpy(data["test_x"]))).argmax(1)
    acc = float((pred == torch.from_numpy(data["test_y"])).float().mean())
    return model, acc


CACHE_ENV = "RAYGEN_CACHE"  # a directory shared by every workdir for what does not depend on one


def load_classifier(cache_dir: str | Path) -> tuple[DigitsClassifier, float]:
    """The cached classifier (trained and cached on first use) and its held-out accuracy.

    It depends on nothing but the digits and its seed, so $RAYGEN_CACHE, when set, holds it for
    every workdir (otherwise `cache_dir`, the workdir's cache)."""
    path = Path(os.environ.get(CACHE_ENV) or cache_dir) / CACHE_NAME
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(state["meta"])
        if meta.get("version") == VERSION:
            model = DigitsClassifier()
            model.load_state_dict(state["state_dict"])
            return model.eval(), meta["holdout_acc"]
    model, acc = train_classifier()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes that train it at once do not collide
    torch.save({"state_dict": model.state_dict(), "meta": json.dumps({"version": VERSION, "holdout_acc": acc})}, tmp)
    tmp.replace(path)
    return model, acc


def digit_labels(labels: Any, class_names: list[str] | None) -> Any:
    """The digit each class id shows: a digits data set's class j is the digit class_names[j] (j
    itself, unless `data.classes` trained on a subset and relabelled it). Tensor or array in, same out."""
    if not class_names:
        return labels
    lookup = np.array([int(n) for n in class_names])
    if torch.is_tensor(labels):
        return torch.as_tensor(lookup)[labels.cpu().long()]
    return lookup[np.asarray(labels)]


@torch.no_grad()
def class_accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of uint8 images (B, H, W, C) the classifier labels as `labels`."""
    pred = model(to_input(images.cpu())).argmax(1)
    return float((pred == labels.cpu()).float().mean())


@torch.no_grad()
def digits_features(model: DigitsClassifier, images: torch.Tensor, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (B, H, W, C) -> penultimate features (B, 128) float64 and predicted classes (B,).

    The features are the space of FD-digits (a Fréchet distance like FID's, in this
    classifier's 128-d feature space instead of Inception's).
    """
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        f = model.features(to_input(images[i : i + batch_size].cpu()))  # (b, 128)
        feats.append(f.double().numpy())
        preds.append(model.head(f).argmax(1).numpy())
    if not feats:
        return np.zeros((0, model.fc.out_features)), np.zeros((0,), np.int64)
    return np.concatenate(feats), np.concatenate(preds)


def classifier_fingerprint(model: DigitsClassifier) -> str:
    """sha256 (16 hex) over the classifier's weights: which feature space FD-digits was measured in."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
