"""Where cuFFT's header and library are, for building csrc/fourier_unit.cpp.

The CUDA toolkit may lack cuFFT (a minimal toolkit: nvcc and cudart) while the CUDA build of
torch brings it as the ``nvidia-cufft`` wheel (``nvidia/cu13``), whose libcufft.so.N torch
itself links. Used by setup.py and tests/test_csrc.py, so both build the extension the same way.
"""
from __future__ import annotations

import glob
import os


def cufft_flags(cuda_home: str) -> tuple[list[str], list[str]]:
    """(C++ compile flags, link flags) for cuFFT: the toolkit's when it has them, else the wheel's.

    The wheel's include directory also holds CUDA runtime headers; it is searched after every
    other directory (``-idirafter``) so that only cufft.h comes from it.
    """
    if cuda_home and os.path.exists(os.path.join(cuda_home, "include", "cufft.h")) and glob.glob(
            os.path.join(cuda_home, "lib64", "libcufft.so*")):
        return [], ["-lcufft"]
    try:
        import nvidia
    except ImportError as exc:
        raise RuntimeError(f"cuFFT not found: no cufft.h in {cuda_home}/include and no nvidia "
                           "wheels (pip install nvidia-cufft)") from exc
    for root in nvidia.__path__:
        for include in sorted(glob.glob(os.path.join(root, "*", "include", "cufft.h"))):
            lib_dir = os.path.join(os.path.dirname(os.path.dirname(include)), "lib")
            libs = sorted(glob.glob(os.path.join(lib_dir, "libcufft.so.*")))
            if libs:
                name = os.path.basename(libs[0])
                return ([f"-idirafter{os.path.dirname(include)}"],
                        [f"-L{lib_dir}", f"-l:{name}", f"-Wl,-rpath,{lib_dir}"])
    raise RuntimeError(f"cuFFT not found: no cufft.h in {cuda_home}/include nor in the nvidia wheels "
                       f"at {list(nvidia.__path__)}")
