"""Shared fixtures. One local Ray instance serves the whole session (starting one costs ~5 s)."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The digits classifier (about 15 s to train) depends on no test: every workdir of the session,
# subprocesses and Ray workers included, shares one copy.
os.environ.setdefault("RAYGEN_CACHE", tempfile.mkdtemp(prefix="raygen-test-cache-"))
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray workers import test-only modules such as the `latent-mean` family plugin (latent_family.py)
# by name, as they would an installed plugin: the processes of the local instance inherit this.
_TESTS = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH")) if p)

# Ray's "ray" logger handler keeps the sys.stderr of the moment Ray configures its logging, which
# importing ray.train (or ray.data, ray.tune) does again. Import them here, at collection, so that
# is the session's stream and not the capsys stream of whichever test imports them first (closed
# after that test: every later Ray log line would then fail).
import ray.data  # noqa: E402, F401
import ray.train  # noqa: E402, F401
import ray.tune  # noqa: E402, F401


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests (fastest on a shared 2-core box); restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with 2 CPUs, like this machine."""
    import ray

    from raygen.config import RayConfig
    from raygen.platform.cluster.connect import init_ray

    init_ray(RayConfig(num_cpus=2))
    # Ray Data attaches its log handler to the stderr of its first run, once per process: run it
    # here, on the real stderr, not inside a test whose captured stream pytest closes afterwards
    ray.data.range(1).take(1)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits8(ray_local, tmp_path_factory):
    """The demo's data set (8x8 digits, 16 grey levels), tokenized once for every e2e test that
    only reads it."""
    from raygen.config import load_config
    from raygen.platform.data.tokenize import tokenize

    root = tmp_path_factory.mktemp("digits8")
    cfg = load_config("demo", [f"workdir={root}", f"data.shards={root / 'digits8'}"])
    return tokenize(cfg, progress=False).out


@pytest.fixture
def run_cli(capsys):
    """Run `raygen ...` in-process; returns (exit code, stdout, stderr)."""
    from raygen.cli import main

    def run(*argv: str):
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def write_image_folder(root, *, classes=("cat", "dog"), per_class=3, size=(20, 12), mode="RGB"):
    """An ImageFolder tree of small PNG/JPEG/WebP images with a per-class colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    exts = [".png", ".jpg", ".webp"]
    for ci, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            arr[..., ci % 3] = 255
            Image.fromarray(arr, "RGB").convert(mode).save(root / cls / f"img{i}{exts[i % 3]}")
    return root


def write_image_parquet(path, *, n=5, size=(10, 10), label_type="int64", corrupt_row=None):
    """A Parquet file with encoded PNG bytes in `image` and class ids in `label`."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    images = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.full((size[1], size[0], 3), 20 * i, np.uint8), "RGB").save(buf, format="PNG")
        images.append(b"not an image" if i == corrupt_row else buf.getvalue())
    labels = [i % 3 for i in range(n)]
    label_arr = pa.array([str(v) for v in labels]) if label_type == "string" else pa.array(labels, pa.int64())
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": label_arr}), path, row_group_size=2)
    return path


# A developer's MLFLOW_TRACKING_URI must not send test runs to their own store.
os.environ.pop("MLFLOW_TRACKING_URI", None)
