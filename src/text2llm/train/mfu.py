"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

    MFU = tokens/s * flops_per_token / (peak FLOP/s per device * devices)

``flops_per_token`` comes from the model (6 x matmul params + attention, PaLM appendix B).
The peak is:

* GPU: the spec-sheet dense bf16 tensor-core peak of known cards (table below);
* CPU: measured once with an fp32 matmul benchmark at the thread count in use and cached in a
  JSON file (``RUN/peak_flops.json`` or ``train.peak_cache``) keyed by CPU model and threads;
* or whatever ``train.peak_flops`` says.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

# dense (no sparsity) bf16 peaks in FLOP/s, from the vendors' spec sheets; first match wins
GPU_BF16_PEAK = [
    ("GB200", 2.5e15), ("B200", 2.25e15), ("B100", 1.75e15),
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("H20", 148e12),
    ("A100", 312e12), ("A800", 312e12), ("A6000", 154.8e12), ("A40", 149.7e12), ("A30", 165e12),
    ("A10G", 70e12), ("A10", 125e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("RTX 6000 Ada", 364e12), ("4090", 165e12), ("4080", 97.5e12), ("3090", 71e12), ("3080", 59.5e12),
    ("MI300X", 1307e12), ("MI250X", 383e12),
]


def gpu_peak_flops(device: torch.device) -> float | None:
    """Spec-sheet dense bf16 peak of a known GPU, or None."""
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_BF16_PEAK:
        if key.lower() in name.lower():
            return peak
    return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_flops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32,
                         device: str = "cpu") -> float:
    """Best-of-``repeats`` FLOP/s of an n x n x n matmul (2 n^3 FLOPs) at the current thread count."""
    a = torch.randn(n, n, dtype=dtype, device=device, generator=torch.Generator(device).manual_seed(0))
    b = torch.randn(n, n, dtype=dtype, device=device, generator=torch.Generator(device).manual_seed(1))
    c = a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def cpu_peak_flops(cache: str | Path | None) -> float:
    """The measured fp32 matmul peak of this CPU at ``torch.get_num_threads()`` threads, cached."""
    key = f"{cpu_name()} | threads={torch.get_num_threads()} | torch={torch.__version__}"
    data = {}
    if cache is not None and Path(cache).is_file():
        try:
            data = json.loads(Path(cache).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            data = {}
        if isinstance(data.get(key), (int, float)) and data[key] > 0:
            return float(data[key])
    peak = measure_matmul_flops()
    if cache is not None:
        data[key] = peak
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(cache).with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        tmp.replace(cache)
    return peak


def device_peak_flops(device: torch.device, override: float = 0.0, cache: str | Path | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s per process, where it came from)."""
    if override > 0:
        return override, "train.peak_flops"
    if device.type == "cuda":
        peak = gpu_peak_flops(device)
        return peak, ("spec sheet, dense bf16" if peak else f"unknown GPU {torch.cuda.get_device_name(device)}")
    if device.type == "cpu":
        return cpu_peak_flops(cache), "measured fp32 matmul"
    return None, f"no peak known for {device.type}"
