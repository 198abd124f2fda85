"""Build and load the native kernel library: nvcc compiles hlwq.cu into a plain shared library (C ABI, static CUDA
runtime, no torch headers) on first use; it is cached by the hash of its source and flags and called through ctypes.

Why not torch.utils.cpp_extension: compiling against torch's headers takes minutes and ties the binary to one torch
ABI; this library builds in seconds with nvcc alone and works with any torch that runs on the same driver.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from pipeline.errors import RuntimeBackendError

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("hlwq.cu")

# sm_90 machine code for Hopper plus PTX so newer GPUs JIT it; one library serves every device of one machine.
FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static", "--use_fast_math",
         "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
         "-gencode=arch=compute_90,code=compute_90")  # fmt: skip
_C = ctypes
_ARGTYPES = {
    "hlwq_rotate": [_C.c_void_p, _C.c_void_p, _C.c_void_p, _C.c_void_p, _C.c_int, _C.c_int, _C.c_int, _C.c_void_p],
    "hlwq_gemv": [_C.c_void_p] * 5 + [_C.c_int] * 7 + [_C.c_void_p],
    "hlwq_dequant": [_C.c_void_p] * 4 + [_C.c_int] * 3 + [_C.c_void_p],
    "hlwq_gather_pinned": [_C.c_void_p] * 3 + [_C.c_int, _C.c_long, _C.c_void_p],
    "hlwq_rotate_pairs": [_C.c_void_p] * 5 + [_C.c_int] * 3 + [_C.c_void_p],
    "hlwq_gemv_tc": [_C.c_void_p] * 6 + [_C.c_int] * 6 + [_C.c_void_p],
    "hlwq_gemv_tc_rot": [_C.c_void_p] * 7 + [_C.c_int] * 6 + [_C.c_void_p] * 3 + [_C.c_float] + [_C.c_void_p] * 3,
    "hlwq_dequant_tiles": [_C.c_void_p] * 3 + [_C.c_int] * 4 + [_C.c_void_p],
    "hlwq_gemv_tc_rot_plan": [_C.c_int] * 6 + [_C.c_void_p] * 3,
    "hlwq_trace_buffer": [_C.c_void_p],
}
# Entries an older source (HLWQ_KERNEL_SOURCE, an A/B against it) may lack: left unset there; hlwq_trace_buffer is
# only in bench/trace_stream.py's traced build.
_OPTIONAL = {"hlwq_gemv_tc_rot_plan", "hlwq_trace_buffer"}


def source() -> Path:
    """The kernel source to build: hlwq.cu, or HLWQ_KERNEL_SOURCE (another version of it with the same C ABI, for
    an A/B of two kernel versions in one session; the library name follows the source's hash, so both stay cached)."""
    alt = os.environ.get("HLWQ_KERNEL_SOURCE", "").strip()
    if not alt:
        return SOURCE
    if not Path(alt).is_file():
        raise RuntimeBackendError(f"HLWQ_KERNEL_SOURCE: no such file: {alt}")
    return Path(alt)


def cache_dir() -> Path:
    root = (
        os.environ.get("HLWQ_KERNEL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hlwq"
    )
    return Path(root)


def library_name() -> str:
    digest = hashlib.sha256(source().read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    return f"hlwq_kernels_{digest}.so"


def build(out_dir: Path | None = None) -> Path:
    """Compile the library into the cache (atomically: temp file + rename) unless it is there; return its path."""
    out_dir = out_dir or cache_dir()
    target = out_dir / library_name()
    if target.exists():
        return target
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if not Path(nvcc).exists():
        raise RuntimeBackendError("the native runtime needs nvcc to build its kernels once (CUDA toolkit not found)")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    log.info("building the HLWQ kernels with %s (once, ~30 s)", nvcc)
    proc = subprocess.run([str(nvcc), *FLAGS, "-o", tmp, str(source())], capture_output=True, text=True)
    if proc.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise RuntimeBackendError(f"nvcc failed to build the HLWQ kernels: {last}")
    os.replace(tmp, target)
    return target


@cache
def library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    for name, argtypes in _ARGTYPES.items():
        if name in _OPTIONAL and not hasattr(lib, name):
            continue
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return lib
