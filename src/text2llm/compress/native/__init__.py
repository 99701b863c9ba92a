"""A native int8 matrix-vector kernel for CPU decoding, compiled on first use (``int8_gemv.c``).

Why: decoding one token multiplies each weight matrix by one row. For the small models this
toolkit trains on a laptop, torch's int8 kernels do not pay off there: ``quantized::linear_dynamic``
(fbgemm) has a fixed cost per call whatever the size, ``aten._weight_int8pack_mm`` is slower than
the fp32 matmul, and the fp32 matmul itself streams 4 bytes per weight. ``int8_gemv.c`` quantizes
the row to int8 and runs the product with integer dot-product instructions (AVX-512 VNNI: 64
multiply-adds per instruction), reading 1 byte per weight (``benchmarks/compress.py``: case ``int8-kernels`` per matrix, ``quantize`` the
decode step end to end; the README quotes both).

Which kernel: one source, compiled for one instruction set chosen from the CPU's flags at run
time (:func:`available_paths`, best first): ``avx512vnni`` (AVX-512 VNNI), ``avxvnni`` (256-bit
AVX-VNNI, Alder Lake / Zen 5 and later), ``avx2`` (``vpmaddubsw``/``vpmaddwd``, any x86-64 with
AVX2 and FMA), ``neon`` (ARMv8.2 dot product, aarch64). Every path computes the same integer sums,
so the numbers do not depend on the path. ``TEXT2LLM_INT8_KERNEL=auto|avx512vnni|avxvnni|avx2|neon|off``
forces one (default ``auto``: the best this CPU has); forcing a path this CPU lacks is an error.

How it is built: with the C compiler found as ``$CC``, ``cc``, ``gcc`` or ``clang``, with the
path's flags (:data:`PATH_FLAGS`), into ``$XDG_CACHE_HOME/text2llm/native/<key>/`` (default
``~/.cache``), where the key hashes the source, the compiler, the path and its flags, and the
CPU's model and feature flags, so that a cache shared between machines never hands a library to a
CPU it was not built for. The build goes to a temporary file renamed into place (concurrent
processes are safe), once per machine, path and source.

When it is not used, and nothing breaks: no compiler, a CPU with none of the paths above, or
``TEXT2LLM_NATIVE=0`` / ``TEXT2LLM_INT8_KERNEL=off``. :func:`load` then returns None,
:func:`reason` says why, and the int8 model runs through torch's kernels as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from text2llm.errors import UserError

SOURCE = Path(__file__).with_name("int8_gemv.c")
FLAGS = ["-O3", "-shared", "-fPIC"]
# Instruction-set flags per path. avx512vnni keeps -march=native (as before: the build only runs
# where the CPU has it); the others name their extensions, so that a forced avx2 build on an
# AVX-512 CPU does not auto-vectorize with AVX-512.
PATH_FLAGS = {
    "avx512vnni": ["-march=native"],
    "avxvnni": ["-mavx2", "-mfma", "-mavxvnni", "-mtune=native"],
    "avx2": ["-mavx2", "-mfma", "-mtune=native"],
    "neon": ["-march=armv8.2-a+dotprod"],
}
PATHS = tuple(PATH_FLAGS)  # best first
PATH_IDS = {"avx512vnni": 1, "avxvnni": 2, "avx2": 3, "neon": 4}  # t2l_path() of each build
ENV = "TEXT2LLM_INT8_KERNEL"
ABI_VERSION = 5
# Rows handled by the kernel per call (it loads each weight once per tile of 4 rows); more rows
# (prefill) go to torch's int8 GEMM, which wins from about 16 rows (benchmarks/compress.py,
# int8-kernels).
MAX_ROWS = 8

_lock = threading.Lock()
_state: dict = {}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _cpu_id() -> str:
    """The CPU's model name and feature flags (Linux), or what ``platform`` knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 ``flags``, aarch64 ``Features``; macOS: sysctl), lower case."""
    try:
        for ln in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if ln.startswith(("flags", "Features")):
                return set(ln.split(":", 1)[1].lower().split())
    except OSError:
        pass
    if sys.platform == "darwin":  # (names as sysctl spells them, mapped to Linux's)
        try:
            out = subprocess.run(["sysctl", "-a"], capture_output=True, text=True, timeout=10).stdout.lower()
        except (OSError, subprocess.SubprocessError):
            return set()
        flags = set(" ".join(ln.split(":", 1)[1] for ln in out.splitlines()
                             if ln.startswith(("machdep.cpu.features", "machdep.cpu.leaf7_features"))).split())
        names = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512bw": "avx512bw",
                 "avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni"}
        got = {v for k, v in names.items() if k in flags}
        if "hw.optional.arm.feat_dotprod: 1" in out:
            got |= {"asimd", "asimddp"}
        return got
    return set()


def available_paths(flags: set[str] | None = None, machine: str | None = None) -> list[str]:
    """The kernel paths this CPU can run, best first (``flags``/``machine``: another CPU's, for tests)."""
    flags = _cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    out = []
    if machine in ("x86_64", "amd64"):
        if {"avx512f", "avx512bw", "avx512_vnni"} <= flags:
            out.append("avx512vnni")
        if {"avx2", "fma", "avx_vnni"} <= flags:
            out.append("avxvnni")
        if {"avx2", "fma"} <= flags:
            out.append("avx2")
    elif machine in ("aarch64", "arm64") and "asimddp" in flags:
        out.append("neon")
    return out


def choose_path(setting: str | None, available: list[str]) -> str | None:
    """The path to build for ``TEXT2LLM_INT8_KERNEL`` = ``setting`` on a CPU with ``available``
    paths: None for ``off`` (or ``auto`` with none available); a :class:`UserError` for an unknown
    name or a path this CPU does not have."""
    s = (setting or "auto").strip().lower()
    if s in ("", "auto"):
        return available[0] if available else None
    if s in ("off", "0", "none", "torch"):
        return None
    if s not in PATH_FLAGS:
        raise UserError(f"{ENV}={setting}: unknown kernel (choose auto, {', '.join(PATHS)} or off)")
    if s not in available:
        raise UserError(f"{ENV}={s}: this CPU cannot run it (it has: {', '.join(available) or 'none of them'})")
    return s


def compile_source(cc: str, path: str, out: str | Path, extra: list[str] | None = None) -> None:
    """Compiles ``int8_gemv.c`` for kernel ``path`` into ``out``; a RuntimeError with the
    compiler's first error line when it fails (also used to compile-test paths this CPU lacks)."""
    cmd = [cc, *FLAGS, *PATH_FLAGS[path], f"-DT2L_PATH_{path.upper()}", *(extra or []), "-o", str(out), str(SOURCE), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        err = (r.stderr.strip().splitlines() or ["(no message)"])
        msg = next((ln for ln in err if "#error" in ln or "error:" in ln), err[0])
        raise RuntimeError(f"{Path(cc).name} failed: {msg.strip()[:200]}")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "text2llm" / "native"


def _build(cc: str, path: str) -> Path:
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, cc.encode(), path.encode(), " ".join(FLAGS + PATH_FLAGS[path]).encode(),
                                     _cpu_id().encode(), platform.machine().encode()])).hexdigest()[:16]
    out = cache_dir() / key / "int8_gemv.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        compile_source(cc, path, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load():
    """The loaded kernel library (ctypes), or None when it cannot be used here (see :func:`reason`).
    Built and loaded once per process. A :class:`UserError` when ``TEXT2LLM_INT8_KERNEL`` forces
    a path this CPU cannot run (or names none)."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, why, kpath = None, None, None
        try:
            setting = os.environ.get(ENV, "auto")
            if os.environ.get("TEXT2LLM_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
                why = "switched off (TEXT2LLM_NATIVE=0)"
            elif sys.platform == "win32":
                why = "no kernel build on Windows"
            elif (kpath := choose_path(setting, available_paths())) is None:
                why = (f"switched off ({ENV}={setting})" if setting.strip().lower() not in ("", "auto") else
                       f"no kernel for this CPU ({platform.machine()}: needs AVX2+FMA, AVX-VNNI, AVX-512 VNNI "
                       "or ARM dot product)")
            elif (cc := _compiler()) is None:
                why = "no C compiler found ($CC, cc, gcc, clang)"
            else:
                path = _build(cc, kpath)
                try:
                    lib = ctypes.CDLL(str(path))
                except OSError:  # a damaged cache entry (a full disk, a copied home dir): build it again, once
                    path.unlink(missing_ok=True)
                    lib = ctypes.CDLL(str(_build(cc, kpath)))
                if lib.t2l_abi_version() != ABI_VERSION or lib.t2l_path() != PATH_IDS[kpath]:
                    lib, why = None, "stale library (ABI version)"
                else:
                    lib.block_cols = lib.t2l_block_cols()
                    lib.path = kpath
                    P, I = ctypes.c_void_p, ctypes.c_int64
                    lib.t2l_pack_i8.argtypes = [P, I, I, P, P]
                    lib.t2l_pack_i8.restype = None
                    lib.t2l_gemv_i8.argtypes = [P, P, I, P, P, P]
                    lib.t2l_gemv_i8.restype = None
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            lib, why = None, str(e).splitlines()[0] if str(e) else type(e).__name__
        _state["lib"], _state["why"], _state["path"] = lib, why, kpath if lib is not None else None
        return lib


def path() -> str | None:
    """The kernel path in use (``avx512vnni``, ``avxvnni``, ``avx2``, ``neon``), None without one."""
    load()
    return _state.get("path")


def reason() -> str | None:
    """Why :func:`load` returned None (None when the kernel is in use)."""
    load()
    return _state.get("why")


def describe() -> str:
    """One line for reports: which kernel int8 decode steps use here."""
    lib = load()
    if lib is not None:
        return f"native int8 GEMV ({lib.path}, text2llm/compress/native/int8_gemv.c)"
    return f"torch quantized::linear_dynamic (native kernel not used: {reason()})"


def reset() -> None:
    """Forget the loaded state (tests; a changed ``TEXT2LLM_NATIVE``)."""
    with _lock:
        _state.clear()


class _Mat(ctypes.Structure):
    _fields_ = [("K", ctypes.c_int64), ("N", ctypes.c_int64), ("wp", ctypes.c_void_p), ("colsum", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class _Norm(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("eps", ctypes.c_float)]


class Int8Gemv:
    """``y = x @ W.T * scale (+ bias)`` for a few fp32 rows ``x`` (N, in) and int8 ``W`` (out, in)
    with one scale per output channel; ``add_to(r, x)`` = ``r + x @ ...`` (the residual add fused).
    The weights are repacked once for the kernel (another int8 copy: 1 byte per weight).

    ``fallback`` (optional): the matmul for inputs the kernel should not take, more than
    ``max_rows`` rows (prefill, where a GEMM that reuses each weight across rows wins) or a dtype
    other than fp32.

    A decode step makes a call per matrix, and each ctypes argument and each torch call has a
    cost of its own next to a small product: so the matrix is described once in a C struct (one
    argument instead of six), and a call is one check, one ``torch.empty`` and the ctypes call."""

    __slots__ = ("wp", "colsum", "scale", "bias", "n_out", "n_in", "fallback", "max_rows", "_fn", "_mat", "_addr")

    def __init__(self, lib, q_OI: torch.Tensor, scale_O: torch.Tensor, bias_O: torch.Tensor | None = None,
                 fallback=None, max_rows: int = MAX_ROWS):
        if q_OI.dtype != torch.int8 or q_OI.dim() != 2:
            raise ValueError(f"Int8Gemv: expected a 2-D int8 weight, got {q_OI.dtype} {tuple(q_OI.shape)}")
        self.n_out, self.n_in = q_OI.shape
        if scale_O.shape != (self.n_out,) or (bias_O is not None and bias_O.shape != (self.n_out,)):
            raise ValueError(f"Int8Gemv: scale/bias must have {self.n_out} values")
        bw = lib.block_cols
        n_pad, groups = (self.n_out + bw - 1) // bw * bw, (self.n_in + 3) // 4
        q = q_OI.contiguous()
        self.wp = torch.empty(n_pad // bw * groups * 4 * bw, dtype=torch.int8)
        self.colsum = torch.empty(n_pad, dtype=torch.int32)
        lib.t2l_pack_i8(q.data_ptr(), self.n_out, self.n_in, self.wp.data_ptr(), self.colsum.data_ptr())
        self.scale = scale_O.detach().to(torch.float32).contiguous()
        self.bias = None if bias_O is None else bias_O.detach().to(torch.float32).contiguous()
        self.fallback, self.max_rows = fallback, max_rows if fallback is not None else 1 << 62
        self._fn = lib.t2l_gemv_i8
        self._mat = _Mat(self.n_in, self.n_out, self.wp.data_ptr(), self.colsum.data_ptr(), self.scale.data_ptr(),
                         None if self.bias is None else self.bias.data_ptr())
        self._addr = ctypes.addressof(self._mat)  # (the tensors above and the struct live as long as self)

    def __call__(self, x_NI: torch.Tensor, r_NO: torch.Tensor | None = None) -> torch.Tensor:
        if self.fallback is not None and (x_NI.shape[0] > self.max_rows or x_NI.dtype != torch.float32):
            y = self.fallback(x_NI)
            return y if r_NO is None else y.add_(r_NO)
        return self._kernel(x_NI, r_NO, None)

    def _kernel(self, x_NI: torch.Tensor, r_NO: torch.Tensor | None, norm_addr: int | None) -> torch.Tensor:
        # (contiguous copies are held in locals: they must outlive the call that reads them)
        x = x_NI if x_NI.is_contiguous() else x_NI.contiguous()
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.n_in:
            raise ValueError(f"Int8Gemv: expected fp32 rows of {self.n_in}, got {x.dtype} {tuple(x.shape)}")
        m = x.shape[0]
        y = torch.empty(m, self.n_out)
        if r_NO is None:
            self._fn(self._addr, x.data_ptr(), m, None, y.data_ptr(), norm_addr)
            return y
        r = r_NO if r_NO.is_contiguous() else r_NO.contiguous()
        if r.dtype != torch.float32 or r.shape != y.shape:
            raise ValueError(f"Int8Gemv: residual {r.dtype} {tuple(r.shape)}, expected float32 {tuple(y.shape)}")
        self._fn(self._addr, x.data_ptr(), m, r.data_ptr(), y.data_ptr(), norm_addr)
        return y

    def add_to(self, r_NO: torch.Tensor, x_NI: torch.Tensor) -> torch.Tensor:
        return self(x_NI, r_NO)

    def with_rmsnorm(self, weight: torch.Tensor, eps: float) -> "NormedInt8Gemv":
        """``x -> self(rms_norm(x) * weight)`` in one kernel call: the norm is applied to each row
        as the kernel reads it for quantization (the decode step's norms before q/k/v, the MLP
        and the head cost no torch call then)."""
        return NormedInt8Gemv(self, weight, eps)


class NormedInt8Gemv:
    """:meth:`Int8Gemv.with_rmsnorm`: ``y = (x / rms(x) * weight) @ W.T * scale (+ bias)``."""

    __slots__ = ("mm", "weight", "eps", "_norm", "_naddr")

    def __init__(self, mm: Int8Gemv, weight: torch.Tensor, eps: float):
        if weight.shape != (mm.n_in,):
            raise ValueError(f"with_rmsnorm: weight of shape {tuple(weight.shape)}, expected ({mm.n_in},)")
        self.mm, self.eps = mm, float(eps)
        self.weight = weight.detach().to(torch.float32).clone()  # (a copy: the kernel holds its address)
        self._norm = _Norm(self.weight.data_ptr(), self.eps)
        self._naddr = ctypes.addressof(self._norm)

    def __call__(self, x_NI: torch.Tensor) -> torch.Tensor:
        mm = self.mm
        if x_NI.shape[0] > mm.max_rows or x_NI.dtype != torch.float32:
            return mm(torch.nn.functional.rms_norm(x_NI, (mm.n_in,), self.weight.to(x_NI.dtype), self.eps))
        return mm._kernel(x_NI, None, self._naddr)
