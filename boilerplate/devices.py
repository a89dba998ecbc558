"""Devices and precision: whether a device and bf16 can be used here (checked before the run starts),
torch's threads, autocast, and how often the host looks at the device during an epoch."""

import contextlib
import os
import sys
from pathlib import Path

import torch

from .errors import described

SYNC_EVERY = 50  # batches between the host's looks at the non-finite flag on an accelerator
# Measured with benchmarks/throughput.py (see docs/performance.md).
BF16_EMULATED_COST = (
    "an epoch of the default model took 1.2 times as long as in fp32 on a CPU whose bf16 "
    "instructions were turned off (ONEDNN_MAX_CPU_ISA=AVX512_CORE), and half as long with them"
)


def chosen(device: str | None) -> str:
    """--device, else $DEVICE, else CUDA where there is one, else the CPU."""
    return device or os.environ.get("DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def device_error(device: str) -> str | None:
    """Why `device` cannot be used here, if it cannot; never creates a CUDA context in this process."""
    try:
        d = torch.device(device)
        if d.type == "cuda":
            if not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count():
                return "no such CUDA device"
        else:  # made and read back: `meta` makes tensors of shapes alone, with nothing to read
            torch.zeros(1, device=d).cpu()
    except (RuntimeError, AssertionError) as e:
        return described(e)
    return None


def bf16_error(device: torch.device) -> str | None:
    """Why bf16 cannot run on `device`, if it cannot; a warning where it would run, but slowly."""
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            return "this GPU has no bf16 arithmetic: it needs compute capability 8.0 (Ampere) or newer"
        return None
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            torch.mm(torch.ones(2, 2, device=device), torch.ones(2, 2, device=device))
    except (RuntimeError, AssertionError, ValueError) as e:
        return described(e)
    if device.type == "cpu":
        with contextlib.suppress(OSError):
            flags = "".join(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
            if why := slow_bf16_cpu(flags, os.environ.get("ONEDNN_MAX_CPU_ISA", "")):
                print(
                    f"Warning: --precision bf16 runs emulated here, slower than fp32 ({why}): "
                    f"{BF16_EMULATED_COST}. Use fp32 on this machine.",
                    file=sys.stderr,
                )
    return None


# The CPU flags of native bf16 arithmetic (Linux's names), and the oneDNN instruction sets below it.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")


def slow_bf16_cpu(cpu_flags: str, onednn_max_isa: str = "") -> str | None:
    """Why bf16 would run emulated, and slowly, on this CPU: no native bf16 instruction among its flags
    (/proc/cpuinfo's), or oneDNN told not to use them (ONEDNN_MAX_CPU_ISA)."""
    if onednn_max_isa.upper() in ONEDNN_ISAS_WITHOUT_BF16:
        return f"ONEDNN_MAX_CPU_ISA={onednn_max_isa} keeps oneDNN from this CPU's bf16 instructions"
    if not any(flag in cpu_flags.split() for flag in BF16_CPU_FLAGS):
        return f"this CPU has no native bf16 instructions ({' or '.join(BF16_CPU_FLAGS)})"
    return None


def use_the_allowed_cores() -> None:
    """Torch's threads: one per core this process may run on (a sweep's workers, a job's share, taskset),
    unless the user set OMP_NUM_THREADS, which torch reads itself."""
    if not os.environ.get("OMP_NUM_THREADS") and hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(len(os.sched_getaffinity(0)))


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """Where the forward pass and the loss run: in bf16 under autocast with --precision bf16 (matrix
    products in bf16, reductions such as the loss in fp32), else in fp32. Parameters, gradients and the
    optimizer's state are fp32 either way."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def sync_interval(device: torch.device) -> int:
    """Batches between the host's looks at the device: on the CPU a look costs nothing."""
    return 1 if device.type == "cpu" else SYNC_EVERY
