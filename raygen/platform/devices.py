"""What the device can do and did: its peak FLOP/s (for MFU) and a process's peak memory."""

from __future__ import annotations

import os
import resource

import torch

# Dense peak TFLOPS per GPU from the vendors' datasheets: (bf16 tensor cores, plain fp32).
# First substring match of torch.cuda.get_device_name() wins; RAYGEN_PEAK_TFLOPS overrides.
GPU_PEAK_TFLOPS = (("H200", 989.4, 66.9), ("H100 PCIe", 756.0, 51.2), ("H100", 989.4, 66.9),
                   ("A100", 312.0, 19.5), ("L40S", 362.1, 91.6), ("L4", 121.0, 30.3), ("A10", 125.0, 31.2))


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's peak FLOP/s at the training precision, or None (CPU, unknown GPU): no perf/mfu then."""
    if device.type != "cuda":
        return None
    if os.environ.get("RAYGEN_PEAK_TFLOPS"):
        return float(os.environ["RAYGEN_PEAK_TFLOPS"]) * 1e12
    name = torch.cuda.get_device_name(device)
    for key, bf16, fp32 in GPU_PEAK_TFLOPS:
        if key in name:
            return (bf16 if precision == "bf16" else fp32) * 1e12
    return None


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    """(GB, what was measured): CUDA's max allocated on a GPU, else this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "CUDA max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "process peak RSS"  # KiB on Linux
