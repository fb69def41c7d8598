"""Runtime rules shared by training, inference and planning: which device, which distributed backend, which device
a rank uses, and when the network runs in bfloat16.

Imports only torch (no MONAI), so the fast inference path can use it.
"""

from __future__ import annotations

import torch

from volseg.errors import UserError

__all__ = ["cpu_has_native_bf16", "distributed_backend", "rank_device", "resolve_device", "use_bf16"]


def resolve_device(name: str | None) -> torch.device:
    """``auto``/None picks CUDA when present; an unavailable device is a user error."""
    if name in (None, "", "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"'{name}' is not a device (use cpu, cuda or cuda:N)", "--device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA was asked for but no CUDA GPU is available", "--device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"there is no GPU {dev.index} (found {torch.cuda.device_count()})", "--device")
    return dev


def distributed_backend(device: str | None) -> str:
    """``nccl`` when the processes will use CUDA (asked for, or ``auto`` on a machine with a GPU), else ``gloo``."""
    wants_cuda = (device in (None, "", "auto") and torch.cuda.is_available()) or str(device).startswith("cuda")
    return "nccl" if wants_cuda else "gloo"


def rank_device(device: str | None, local_rank: int) -> str | None:
    """The device of the process with ``local_rank`` on its machine: one GPU per process under NCCL (GPU
    ``local_rank`` modulo the GPUs present), else ``device`` as given."""
    if torch.cuda.is_available() and distributed_backend(device) == "nccl":
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo's flags)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether the network runs in bfloat16 autocast for a precision setting (auto, fp32, bf16) on a device."""
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_has_native_bf16()
