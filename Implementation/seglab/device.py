"""Which device and precision a run uses: the one place that decides, for training and inference."""
from __future__ import annotations

import torch


class DeviceError(RuntimeError):
    """A device that this machine does not have, or a precision it cannot run."""


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> if there is a GPU, else the CPU; 'cuda' -> cuda:<local_rank>;
    'cuda:N', 'cpu' as given. A CUDA device becomes the current one (DDP needs that)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} asked for, but this machine has no CUDA device. "
                              "Use run.device=cpu (--device cpu) or auto.")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device} asked for, but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast runs natively: CUDA with bf16, or a CPU oneDNN build with
    bf16 instructions (AVX512-BF16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available()
                        and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False
