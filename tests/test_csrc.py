"""Tests of csrc/: the CUDA spectral_mix kernel and its torch binding.

- Ahead of time, no GPU: nvcc compiles csrc/spectral_mix.cu to cubins for sm_80 and sm_90; ptxas
  must report no spills, at most 255 registers and shared memory within the SM's limit.
- On the CPU: the kernel source itself runs under a small emulation of the CUDA runtime (one OS
  thread per CUDA thread, a barrier per block for __syncthreads, function statics as shared
  memory) against the torch reference, for both tile configurations, odd sizes and strided input.
- The torch binding is built with torch.utils.cpp_extension.load; its argument checks run on
  the host, so they are tested here on CPU tensors.
- With a GPU (marker ``gpu``): the built extension against the torch reference.
- ffc_kernels._ext imports without initialising CUDA and records why the extension is missing.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNEL_SOURCE = CSRC / "spectral_mix.cu"

# Shared memory a block may use (the per-SM 228 KB / 164 KB less 1 KB the driver reserves).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


# --- inputs and reference -------------------------------------------------------------------------


def make_case(B, Ci, Co, H, W, bias=True, strided=False, device="cpu", seed=0):
    """rfft2 of a random fp32 image, and a folded weight/bias; strided picks channels and
    batches out of a larger spectrum, so batch and channel strides are not the packed ones."""
    g = torch.Generator().manual_seed(seed)
    extra_c, step_b = (3, 2) if strided else (0, 1)
    image = torch.randn(B * step_b, Ci + extra_c, H, W, generator=g)
    spec = torch.fft.rfft2(image.to(device), norm="ortho")
    if strided:
        spec = spec[::step_b, 2:2 + Ci]
    weight = (torch.randn(2 * Co, 2 * Ci, generator=g) / (2 * Ci) ** 0.5).to(device)
    b = torch.randn(2 * Co, generator=g).to(device) if bias else None
    return spec, weight, b


def assert_matches_reference(out, spec, weight, bias, relu):
    """Within a small multiple of plain fp32 torch's own error against fp64, with a floor that
    grows with the reduction length 2 * Ci."""
    # Imported here, not at the top: the AddressSanitizer run imports this file without the
    # package (Triton's native code does not load under an ASan preload).
    from ffc_kernels.ops.spectral_mix import spectral_mix_reference

    ref64 = spectral_mix_reference(spec.to(torch.complex128), weight.double(),
                                   None if bias is None else bias.double(), relu)
    prev_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        ref32 = spectral_mix_reference(spec, weight, bias, relu)
    finally:
        torch.backends.cudnn.allow_tf32 = prev_tf32
    assert out.shape == ref64.shape and out.dtype == torch.complex64
    scale = max(ref64.abs().max().item(), 1.0)
    torch_err = (ref32.to(torch.complex128) - ref64).abs().max().item()
    err = (out.to(torch.complex128) - ref64).abs().max().item()
    tol = max(4 * torch_err, 4e-7 * (2 * spec.shape[1]) ** 0.5 * scale)
    assert err <= tol, f"max abs error {err:.3g} > {tol:.3g} (fp32 torch: {torch_err:.3g})"


# --- toolchain ------------------------------------------------------------------------------------


def find_cuda_home() -> str | None:
    """CUDA_HOME / CUDA_PATH, else the toolkit of the nvcc on PATH (which may be a wrapper
    script, so ask nvcc itself where it lives)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True)
    here = re.search(r"^#\$ _HERE_=(.+)$", dry.stdout + dry.stderr, re.M)
    return str(Path(here.group(1).strip()).parent) if here else str(Path(nvcc).resolve().parents[1])


CUDA_HOME = find_cuda_home()
NO_NVCC = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
needs_nvcc = pytest.mark.skipif(CUDA_HOME is None, reason=NO_NVCC)


# --- (a) ahead-of-time compile: registers, spills, shared memory ----------------------------------


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """Per kernel: registers, spill stores/loads and static shared memory from `ptxas -v`."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            current = kernels.setdefault(m.group(1),
                                         {"spill_stores": 0, "spill_loads": 0, "smem": 0})
        elif current is None:
            continue
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            current["spill_stores"], current["spill_loads"] = int(m.group(1)), int(m.group(2))
        elif m := re.search(r"Used (\d+) registers", line):
            current["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                current["smem"] = int(s.group(1))
    return kernels


def kernel_label(mangled: str) -> str:
    m = re.search(r"TileConfigILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)EEELb([01])", mangled)
    if not m:
        return mangled
    bm, bn, bk, tm, tn, _, relu = m.groups()
    return f"tile {bm}x{bn}x{bk} thread {tm}x{tn} relu={relu}"


@needs_nvcc
@pytest.mark.parametrize("arch", [80, 90])
def test_cubin_resources(arch, tmp_path):
    nvcc = str(Path(CUDA_HOME) / "bin" / "nvcc")
    cmd = [nvcc, f"-arch=sm_{arch}", "-cubin", "-O3", "-Xptxas", "-v", str(KERNEL_SOURCE),
           "-o", str(tmp_path / f"spectral_mix_sm{arch}.cubin")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kernels = parse_ptxas(proc.stdout + proc.stderr)
    assert len(kernels) == 4, f"expected 2 tile configs x relu on/off, got {list(kernels)}"
    print(f"\nsm_{arch}: {'kernel':42s} {'regs':>5s} {'smem B':>7s} {'spill st/ld':>11s}")
    for name, k in sorted(kernels.items(), key=lambda kv: kernel_label(kv[0])):
        print(f"sm_{arch}: {kernel_label(name):42s} {k['registers']:5d} {k['smem']:7d} "
              f"{k['spill_stores']:5d}/{k['spill_loads']:<5d}")
    for name, k in kernels.items():
        label = f"sm_{arch} {kernel_label(name)}"
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, f"{label} spills: {k}"
        assert k["registers"] <= 255, f"{label} uses {k['registers']} registers"
        assert k["smem"] <= SMEM_LIMIT[arch], f"{label} uses {k['smem']} B of shared memory"


# --- (b) the kernel source, emulated on the CPU ---------------------------------------------------

# Just enough of the CUDA runtime for spectral_mix.cu, as plain C++20. Blocks run one after the
# other, each as one OS thread per CUDA thread, so a function-static array is the block's shared
# memory and a std::barrier is __syncthreads; races and missing barriers show up as wrong results.
FAKE_CUDA_RUNTIME = r"""
#pragma once
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <math.h>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {
inline int sm_count = 132;
inline std::barrier<>* block_barrier = nullptr;

template <class Kernel>
struct Launch {
  Kernel* kernel;
  dim3 grid, block;
  template <class... Args>
  void operator()(Args... args) const {
    gridDim = grid;
    blockDim = block;
    const unsigned threads = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          std::barrier<> barrier(threads);
          block_barrier = &barrier;
          std::vector<std::thread> pool;
          for (unsigned t = 0; t < threads; ++t)
            pool.emplace_back([=, this] {
              threadIdx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
              blockIdx = dim3(bx, by, bz);
              kernel(args...);
            });
          for (auto& thread : pool) thread.join();
        }
  }
};

template <class Kernel>
Launch<Kernel> launch(Kernel* kernel, dim3 grid, dim3 block, size_t, cudaStream_t) {
  return {kernel, grid, block};
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = emu::sm_count;
  return cudaSuccess;
}
"""

EMULATION_ENTRY = r"""
extern "C" void emu_spectral_mix(const void* x, int64_t x_batch_stride, int64_t x_chan_stride,
                                 const float* w, const float* bias, void* out, int B, int Ci,
                                 int Co, int64_t N, bool relu, int sm_count) {
  emu::sm_count = sm_count;
  spectral_mix_launch(static_cast<const float2*>(x), x_batch_stride, x_chan_stride, w, bias,
                      static_cast<float2*>(out), B, Ci, Co, N, relu, nullptr);
}
"""


def build_emulation(build: Path, extra_flags=()) -> Path:
    """Compile spectral_mix.cu's own source, its launch rewritten for the emulation, as a
    shared library exporting emu_spectral_mix."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) for the CPU emulation of the kernel")
    (build / "fake").mkdir(exist_ok=True)
    (build / "fake" / "cuda_runtime.h").write_text(FAKE_CUDA_RUNTIME)
    source, launches = re.subn(r"(\w+<[^<>;]*>)<<<(.*?)>>>", r"emu::launch(\1, \2)",
                               KERNEL_SOURCE.read_text(), flags=re.S)
    assert launches == 1, "expected one kernel launch (kernel<...><<<...>>>) in spectral_mix.cu"
    (build / "spectral_mix_emu.cpp").write_text(source + EMULATION_ENTRY)
    lib = build / "spectral_mix_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", *extra_flags,
           f"-I{build / 'fake'}", f"-I{CSRC}", str(build / "spectral_mix_emu.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 and "barrier" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip(f"{cxx} lacks C++20 <barrier>")
    assert proc.returncode == 0, proc.stderr
    return lib


def load_emulation(lib: Path):
    """run(spec, weight, bias, relu, sm_count) -> out, through the emulated kernel."""
    fn = ctypes.CDLL(str(lib)).emu_spectral_mix
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                   ctypes.c_int64, ctypes.c_bool, ctypes.c_int]

    def run(spec, weight, bias, relu, sm_count):
        B, Ci, H, Wf = spec.shape
        Co = weight.shape[0] // 2
        weight = weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        out = torch.full((B, Co, H, Wf), float("nan"), dtype=torch.complex64)
        fn(spec.data_ptr(), spec.stride(0), spec.stride(1), weight.data_ptr(),
           None if bias is None else bias.data_ptr(), out.data_ptr(), B, Ci, Co, H * Wf, relu,
           sm_count)
        return out

    return run


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    return load_emulation(build_emulation(tmp_path_factory.mktemp("spectral_mix_emu")))


# sm_count steers the launcher's choice: with 1000 SMs the large tile never fills a wave (small
# tile); with 1 SM it does whenever Co > 16.
TILES = {"small_tile": 1000, "large_tile": 1}

EMULATED_CASES = [
    # B, Ci, Co, H, W, bias, relu, strided
    (1, 3, 5, 4, 7, True, True, False),       # one partial tile in every dimension
    (2, 19, 37, 6, 21, True, False, False),   # 3 k stages, odd Wf = 11
    (3, 10, 70, 12, 41, False, True, False),  # 2 N tiles, 2 large / 5 small M tiles, no bias
    (2, 17, 20, 5, 9, True, True, True),      # channel slice and batch step of a larger spectrum
]


@pytest.mark.parametrize("tile", list(TILES))
@pytest.mark.parametrize("B,Ci,Co,H,W,bias,relu,strided", EMULATED_CASES)
def test_emulated_kernel_matches_reference(emulated, tile, B, Ci, Co, H, W, bias, relu, strided):
    spec, weight, b = make_case(B, Ci, Co, H, W, bias=bias, strided=strided)
    if strided:
        assert not spec.is_contiguous()
    out = emulated(spec, weight, b, relu, TILES[tile])
    assert_matches_reference(out, spec, weight, b, relu)


def test_emulated_kernel_relu_passes_nan(emulated):
    spec, weight, b = make_case(1, 2, 3, 3, 4)
    spec[0, 1, 2, 1] = complex(float("nan"), 0.0)
    out = emulated(spec, weight, b, True, TILES["small_tile"])
    assert out[0, :, 2, 1].real.isnan().all() and out[0, :, 2, 1].imag.isnan().all()
    assert not out[0, :, 2, 2].real.isnan().any()


def test_emulated_kernel_stays_in_bounds(tmp_path):
    """Every emulated case again under AddressSanitizer: the kernel's masks must keep its loads
    inside the input tensors, whose allocations end exactly at their last element (results
    cannot show an over-read: positions past N only feed outputs that are never stored)."""
    libasan = subprocess.run([shutil.which("g++") or "g++", "-print-file-name=libasan.so"],
                             capture_output=True, text=True).stdout.strip()
    if not Path(libasan).is_absolute():
        pytest.skip("no AddressSanitizer runtime (libasan.so) for g++")
    lib = build_emulation(tmp_path, ["-fsanitize=address", "-fno-omit-frame-pointer"])
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_csrc as t
run = t.load_emulation({str(lib)!r})
for B, Ci, Co, H, W, bias, relu, strided in t.EMULATED_CASES:
    for sm_count in t.TILES.values():
        spec, weight, b = t.make_case(B, Ci, Co, H, W, bias=bias, strided=strided)
        run(spec, weight, b, relu, sm_count)
assert "ffc_kernels" not in sys.modules
print("in bounds")
"""
    env = {**os.environ, "LD_PRELOAD": libasan, "ASAN_OPTIONS": "detect_leaks=0"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0 and "in bounds" in proc.stdout, proc.stderr[-4000:]


# --- (b) the torch binding: build, import, host-side argument checks ------------------------------


@pytest.fixture(scope="module")
def built_ext(tmp_path_factory):
    if CUDA_HOME is None:
        pytest.skip(NO_NVCC)
    build = tmp_path_factory.mktemp("spectral_mix_ext")
    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        # cpp_extension reads CUDA_HOME once, at import, and a wrapper nvcc on PATH misleads its
        # guess: set it before the import, and on the module in case it was imported earlier.
        mp.setenv("CUDA_HOME", CUDA_HOME)
        import torch.utils.cpp_extension as cpp_extension

        mp.setattr(cpp_extension, "CUDA_HOME", CUDA_HOME)
        module = cpp_extension.load(
            name="ffc_kernels_csrc_test",
            sources=[str(CSRC / "bindings.cpp"), str(KERNEL_SOURCE)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-gencode=arch=compute_90,code=sm_90",
                               "-gencode=arch=compute_80,code=sm_80"],
            build_directory=str(build),
        )
    print(f"\nbuilt the torch extension in {time.perf_counter() - start:.1f} s")
    return module


def test_extension_builds_and_imports(built_ext):
    assert callable(built_ext.spectral_mix)
    assert "FourierUnit" in built_ext.spectral_mix.__doc__


def _rejects(ext, message, spec, weight, bias=None, relu=True):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        ext.spectral_mix(spec, weight, bias, relu)


def test_extension_checks_arguments(built_ext):
    spec, weight, bias = make_case(2, 3, 4, 5, 8)
    _rejects(built_ext, "spec must be complex64", spec.to(torch.complex128), weight)
    _rejects(built_ext, "spec must be 4-D (B, Ci, H, Wf), got 3-D", spec[0], weight)
    _rejects(built_ext, "weight must be float32, got Double", spec, weight.double())
    _rejects(built_ext, "weight must be (2 * Co, 2 * Ci) = (2 * Co, 6)", spec, weight[:, :4])
    _rejects(built_ext, "weight must be (2 * Co, 2 * Ci) = (2 * Co, 6)", spec, weight[:7])
    _rejects(built_ext, "bias must be float32", spec, weight, bias.half())
    _rejects(built_ext, "bias must be 1-D of size 2 * Co = 8", spec, weight, bias[:6])
    _rejects(built_ext, "spatial dims (H, Wf) must be contiguous", spec.transpose(2, 3), weight)
    _rejects(built_ext, "spec must be a CUDA tensor, got device cpu", spec, weight, bias)
    # Arbitrary batch and channel strides pass every layout check and reach the device check.
    strided, weight_s, _ = make_case(2, 3, 4, 5, 8, strided=True)
    _rejects(built_ext, "spec must be a CUDA tensor", strided, weight_s)


# --- (c) on a GPU ---------------------------------------------------------------------------------

GPU_CASES = [
    # B, Ci, Co, H, W, bias, relu, strided
    (1, 3, 5, 4, 7, True, True, False),
    (2, 19, 37, 6, 21, True, False, False),
    (3, 10, 70, 12, 41, False, True, False),
    (2, 17, 20, 5, 9, True, True, True),
    (1, 192, 192, 64, 64, True, True, False),    # big-lama's FourierUnit at 512^2: small tiles
    (2, 192, 192, 128, 128, True, True, False),  # at 1024^2: enough large tiles to fill a GPU
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("B,Ci,Co,H,W,bias,relu,strided", GPU_CASES)
def test_gpu_matches_reference(built_ext, B, Ci, Co, H, W, bias, relu, strided):
    spec, weight, b = make_case(B, Ci, Co, H, W, bias=bias, strided=strided, device="cuda")
    out = built_ext.spectral_mix(spec, weight, b, relu)
    torch.cuda.synchronize()
    assert_matches_reference(out, spec, weight, b, relu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_runs_on_current_stream(built_ext):
    spec, weight, b = make_case(2, 8, 8, 16, 16, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = built_ext.spectral_mix(spec, weight, b, True)
    stream.synchronize()
    assert_matches_reference(out, spec, weight, b, True)


# --- ffc_kernels._ext -----------------------------------------------------------------------------


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_ext_import_never_initialises_cuda():
    out = _python("""
        import torch
        from ffc_kernels import _ext
        print(torch.cuda.is_initialized(), _ext.available(), _ext.why_unavailable())
    """)
    initialised, available, why = out.strip().split(" ", 2)
    assert initialised == "False"
    assert (available == "True") == (why == "None")


def test_ext_records_why_a_broken_extension_is_missing():
    out = _python("""
        import importlib.abc, sys

        class Broken(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "ffc_kernels._C":
                    raise ImportError("_C.so: undefined symbol: _ZN3c10fake")

        sys.meta_path.insert(0, Broken())
        from ffc_kernels import _ext
        print(_ext.available())
        print(_ext.why_unavailable())
        try:
            _ext.spectral_mix(None, None, None, True)
        except RuntimeError as exc:
            print(exc)
    """)
    available, why, error = out.strip().splitlines()
    assert available == "False"
    assert "undefined symbol" in why and "undefined symbol" in error


def test_packed_adapter_feeds_the_kernel_lamas_layout(monkeypatch):
    # The extension takes LaMa's (2Co, 2Ci) weight; the ops pass (2, 2, Co, Ci) blocks and two
    # scales. A stand-in kernel (the reference math) checks the adapter's unpacking and its cache.
    import torch

    from ffc_kernels import _ext
    from ffc_kernels.ops.spectral_mix import pack_bias, pack_weight, spectral_mix_reference

    monkeypatch.setattr(_ext, "spectral_mix", lambda spec, w, b, relu: spectral_mix_reference(spec, w, b, relu))
    torch.manual_seed(0)
    spec = torch.fft.rfft2(torch.randn(2, 5, 6, 7))
    weight, bias = torch.randn(6, 10), torch.randn(6)
    packed_w, packed_b = pack_weight(weight), pack_bias(bias)
    expected = spectral_mix_reference(spec, weight * 0.5, bias * 0.25, True)
    assert torch.allclose(_ext.spectral_mix_packed(spec, packed_w, packed_b, True, 0.5, 0.25), expected, atol=1e-5)
    packed_w.mul_(2)  # in place: the cached unpacked weight must follow
    expected = spectral_mix_reference(spec, weight, bias * 0.25, True)
    assert torch.allclose(_ext.spectral_mix_packed(spec, packed_w, packed_b, True, 0.5, 0.25), expected, atol=1e-5)
    with torch.inference_mode():  # folded weights made there are inference tensors
        w_inf, b_inf = pack_weight(weight), pack_bias(bias)
        got = _ext.spectral_mix_packed(spec, w_inf, b_inf, False, 1.0, 1.0)
    assert torch.allclose(got, spectral_mix_reference(spec, weight, bias, False), atol=1e-5)
