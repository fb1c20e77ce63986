"""The FID Inception-v3: pool3 features (2048-d) for FID and precision/recall, logits for IS.

This is the network of pytorch-fid's `fid_inception_v3()`: torchvision's Inception3 with
1008 classes and no auxiliary head, with the blocks patched to match the TensorFlow graph
the FID weights were ported from ("pt_inception-2015-12-05", the Inception of TF's FID code):

- Mixed_5b/5c/5d (InceptionA), Mixed_6b..6e (InceptionC) and Mixed_7b (InceptionE): the
  pool branch averages without counting the zero padding (`count_include_pad=False`);
- Mixed_7c (InceptionE): the pool branch max-pools instead of average-pooling (a quirk of
  that graph, kept because the weights were fitted with it).

Spatial features (sFID): OpenAI's ADM evaluator (guided-diffusion/evaluations/evaluator.py) also
reads the TF tensor `mixed_6/conv:0`. The TF graph numbers its mixed blocks mixed, mixed_1, ...
mixed_10 = Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, ..., so `mixed_6` is Mixed_6d, and its `conv` is the
1x1 branch: `mixed_6/conv:0` == the output of `Mixed_6d.branch1x1` here (after its batch norm
and ReLU), (B, 192, 17, 17). ADM keeps its first 7 channels in TF's NHWC layout, flattened per
image: (B, 17, 17, 7) -> (B, 2023) = `forward(x, spatial=True)[2]`.

Module and parameter names match torchvision's, so the state dict of
`pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's release file) loads as it is, with
`torch.load(weights_only=True)`, from a local path. Nothing is ever downloaded.

Why hand-written: pytorch-fid, torch-fidelity and clean-fid all require torchvision, and
torchvision cannot be imported beside the pinned CPU torch 2.13.0 here (the PyPI wheel of its
matching release, 0.28.0, is a CUDA build whose `_C.so` needs libtorch_cuda, so
`import torchvision` fails with "operator torchvision::nms does not exist"; 0.29 wants
torch>=2.14). The blocks below are torchvision's, written out; the FID patches are
pytorch-fid's.

    net = FIDInceptionV3().eval()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    pool, logits = net(images)  # float (B, 3, H, W) in [0, 1] -> (B, 2048), (B, 1008)
    pool, logits, spatial = net(images, spatial=True)  # ... and (B, 2023), ADM's sFID features
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's FID weights release
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub convention: the file name carries its hash prefix
INPUT_SIZE = 299  # images are resized (bilinear) to 299x299, as pytorch-fid does
POOL_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's softmax: 1000 ImageNet classes + 8 unused
SPATIAL_CHANNELS = 7  # ADM's sFID keeps the first 7 channels of mixed_6/conv (Mixed_6d.branch1x1)
SPATIAL_GRID = 17  # Mixed_6d's grid at the 299x299 input
SPATIAL_DIM = SPATIAL_GRID * SPATIAL_GRID * SPATIAL_CHANNELS  # 2023


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, TF's) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **kw)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 3x3 average pool does not count the zero padding (the FID patch).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/c/d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1 -> 224 + pool_features channels."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, 35, 35) -> (B, 224 + pool, 35, 35)
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 288, 35, 35) -> (B, 768, 17, 17)
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, c_in: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor,
                keep_branch1x1: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, 768, 17, 17) -> (B, 768, 17, 17); with keep_branch1x1, also the 1x1 branch's output
        (B, 192, 17, 17) as a second value (computed once: it is a slice of the block's own work)."""
        b1 = self.branch1x1(x)  # (B, 192, 17, 17)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        out = torch.cat([b1, b7, bd, bp], 1)
        return (out, b1) if keep_branch1x1 else out


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 768, 17, 17) -> (B, 1280, 8, 8)
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """Mixed_7b/7c: expanded filter bank; `pool` is "avg" (7b, TF-style) or "max" (7c, the FID quirk)."""

    def __init__(self, c_in: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, 8, 8) -> (B, 2048, 8, 8)
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)  # (B, 768, 8, 8)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)  # (B, 768, 8, 8)
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


class FIDInceptionV3(nn.Module):
    """Images in [0, 1] -> (pool3 features (B, 2048), logits (B, 1008)), pytorch-fid's preprocessing."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C), C in {1, 3} -> float (B, 3, H, W) in [0, 1] (grey repeated to RGB)."""
        x = images.float().div(255.0).permute(0, 3, 1, 2)  # (B, C, H, W)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def forward(self, x: torch.Tensor, spatial: bool = False) -> tuple[torch.Tensor, ...]:
        """x float (B, 3, H, W) in [0, 1] -> pool (B, 2048), logits (B, 1008)[, spatial (B, 2023)].

        The logits are the pool features times the softmax weights without the bias, as in
        the original Inception Score code (and torch-fidelity's `logits_unbiased`).
        With `spatial`, also ADM's sFID features: the first 7 channels of Mixed_6d.branch1x1's
        output (TF's `mixed_6/conv:0`) in NHWC order, flattened (see the module docstring).
        """
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # (B, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_1a_3x3(x)  # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6c(self.Mixed_6b(x))  # (B, 768, 17, 17)
        if spatial:
            x, b1 = self.Mixed_6d(x, keep_branch1x1=True)  # (B, 768, 17, 17), (B, 192, 17, 17)
            feats = b1[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(b1), SPATIAL_DIM)  # (B, 2023)
        else:
            x = self.Mixed_6d(x)
        x = self.Mixed_6e(x)  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (B, 2048): adaptive average pool to 1x1
        logits = pool @ self.fc.weight.t()  # (B, 1008)
        return (pool, logits, feats) if spatial else (pool, logits)


def state_dict_problems(net: FIDInceptionV3, state: dict[str, torch.Tensor]) -> list[str]:
    """What keeps `state` from loading into `net`: missing or unexpected keys, wrong shapes.

    BatchNorm's `num_batches_tracked` counters may be absent (older saves); nothing else may.
    """
    want = net.state_dict()
    optional = {k for k in want if k.endswith("num_batches_tracked")}
    problems = [f"missing key {k}" for k in want if k not in state and k not in optional]
    problems += [f"unexpected key {k}" for k in state if k not in want]
    problems += [
        f"{k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
        for k, v in want.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    return problems


def load_weights(net: FIDInceptionV3, state: dict[str, torch.Tensor]) -> FIDInceptionV3:
    """Load a checked state dict (raises ValueError naming the first problems)."""
    if not isinstance(state, dict):
        raise ValueError(f"expected a state dict, got {type(state).__name__}")
    problems = state_dict_problems(net, state)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError("; ".join(problems[:3]) + more)
    net.load_state_dict(state, strict=False)  # only num_batches_tracked may be missing (checked above)
    return net.eval()
