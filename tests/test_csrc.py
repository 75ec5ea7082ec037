"""Tests of csrc/: the CUDA spectral_mix kernels (SIMT fp32 and TF32 tensor cores), the CUDA
FourierUnit (cuFFT plans, R2C, mix, C2R in place) and their torch binding.

- Ahead of time, no GPU: nvcc compiles csrc/spectral_mix.cu and spectral_mix_mma.cu to cubins for
  sm_80 and sm_90; ptxas must report no spills, registers within the launch bounds and shared
  memory within the SM's limit; the TF32/BF16 kernels' PTX and SASS must multiply on tensor cores.
- On the CPU: the kernel sources themselves run under a small emulation of the CUDA runtime (one
  OS thread per CUDA thread, a barrier per block for __syncthreads, function statics as shared
  memory, a warp-wide mma.sync built from the PTX ISA's fragment tables) against the torch
  reference (the MMA kernels against the fp64 sum of TF32- or BF16-rounded products), for both tile
  configurations, odd sizes and strided input; fourier_unit.cpp runs with them and a stand-in
  cuFFT against LaMa's FourierUnit.
- The torch binding is built with torch.utils.cpp_extension.load; its argument checks run on
  the host, so they are tested here on CPU tensors.
- With a GPU (marker ``gpu``): the built extension against the torch reference, and
  ops.fourier_unit dispatching to it under FFC_KERNELS_BACKEND=cuda.
- ffc_kernels._ext imports without initialising CUDA and records why the extension is missing.
"""
from __future__ import annotations

import ctypes
import os
import re
import runpy
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
MMA_SOURCE = CSRC / "spectral_mix_mma.cu"
# What setup.py compiles into ffc_kernels._C, in the same order.
EXTENSION_SOURCES = ("bindings.cpp", "spectral_mix.cu", "spectral_mix_mma.cu", "fourier_unit.cpp")
cufft_flags = runpy.run_path(str(CSRC / "cufft_flags.py"))["cufft_flags"]

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
    m = re.search(r"(TileConfig|MmaTile)ILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)EEE"
                  r"(?:NS_\d+(Tf32|Bf16)OperandsE)?Lb([01])", mangled)
    if not m:
        return mangled
    kind, bm, bn, bk, a, b, _, operands, relu = m.groups()
    what = f"thread {a}x{b}" if kind == "TileConfig" else f"warps {a}x{b} {operands.lower()}"
    return f"tile {bm}x{bn}x{bk} {what} relu={relu}"


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


TF32_MMA = "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"
BF16_MMA = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
# MMAs per kernel (the k loop is unrolled): 2 x 2 tiles per k step; a BK = 8 stage is 2 TF32 k
# steps (4 channels each) or 1 BF16 k step (8 channels).
MMAS_PER_KERNEL = {"tf32": 8, "bf16": 4}


def compile_cubin(source: Path, arch: int, out: Path) -> dict[str, dict[str, int]]:
    nvcc = str(Path(CUDA_HOME) / "bin" / "nvcc")
    cmd = [nvcc, f"-arch=sm_{arch}", "-cubin", "-O3", "-Xptxas", "-v", str(source), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return parse_ptxas(proc.stdout + proc.stderr)


@needs_nvcc
@pytest.mark.parametrize("arch", [80, 90])
def test_mma_cubin_resources_and_mma(arch, tmp_path):
    """spectral_mix_mma.cu: no spills, registers within the launch bounds (85 for three blocks
    per SM), shared memory within the limit, and every kernel's PTX multiplying with its
    precision's mma.sync, as often as its tile implies."""
    kernels = compile_cubin(MMA_SOURCE, arch, tmp_path / f"mma_sm{arch}.cubin")
    assert len(kernels) == 4, f"expected (tf32, bf16) x relu on/off, got {list(kernels)}"
    print(f"\nsm_{arch}: {'kernel':42s} {'regs':>5s} {'smem B':>7s} {'spill st/ld':>11s}")
    for name, k in sorted(kernels.items(), key=lambda kv: kernel_label(kv[0])):
        label = f"sm_{arch} {kernel_label(name)}"
        print(f"{label:48s} {k['registers']:5d} {k['smem']:7d} {k['spill_stores']:5d}/{k['spill_loads']:<5d}")
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, f"{label} spills: {k}"
        assert k["registers"] <= 85, f"{label} uses {k['registers']} registers (> 85)"
        assert k["smem"] <= SMEM_LIMIT[arch], f"{label} uses {k['smem']} B of shared memory"
    nvcc = str(Path(CUDA_HOME) / "bin" / "nvcc")
    ptx_file = tmp_path / f"mma_sm{arch}.ptx"
    proc = subprocess.run([nvcc, f"-arch=sm_{arch}", "-ptx", "-O3", str(MMA_SOURCE), "-o", str(ptx_file)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    entries = ptx_file.read_text().split(".entry ")[1:]
    assert len(entries) == 4
    for body in entries:
        label = kernel_label(body[:body.index("(")])
        precision = label.split()[-2]
        mma, other = (TF32_MMA, BF16_MMA) if precision == "tf32" else (BF16_MMA, TF32_MMA)
        assert body.count(mma) == MMAS_PER_KERNEL[precision] and other not in body, label


def find_cuobjdump() -> str | None:
    """The toolkit's cuobjdump, else the one Triton ships (a minimal toolkit may lack it)."""
    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "cuobjdump").exists():
        return str(Path(CUDA_HOME) / "bin" / "cuobjdump")
    try:
        import triton
    except ImportError:
        return None
    candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(candidate) if candidate.exists() else None


@needs_nvcc
@pytest.mark.parametrize("arch", [80, 90])
def test_mma_sass_runs_on_tensor_cores(arch, tmp_path):
    """The machine code, not only the PTX: ptxas kept every MMA as a tensor-core HMMA."""
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (toolkit or Triton's) to disassemble the cubin")
    cubin = tmp_path / f"mma_sm{arch}.cubin"
    compile_cubin(MMA_SOURCE, arch, cubin)
    proc = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    hmma = [line for line in proc.stdout.splitlines() if "HMMA" in line]
    print(f"\nsm_{arch}: {len(hmma)} HMMA, e.g. {hmma[0].split('*/')[1].split(';')[0].strip() if hmma else None}")
    assert sum(".F32.TF32" in line for line in hmma) == 2 * 8  # 2 x relu on/off
    assert sum(".F32.BF16" in line for line in hmma) == 2 * 4
    assert len(hmma) == 2 * (8 + 4)


# --- (b) the kernel source, emulated on the CPU ---------------------------------------------------

# Just enough of the CUDA runtime for spectral_mix.cu, as plain C++20. Blocks run one after the
# other, each as one OS thread per CUDA thread, so a function-static array is the block's shared
# memory and a std::barrier is __syncthreads; races and missing barriers show up as wrong results.
FAKE_CUDA_RUNTIME = r"""
#pragma once
#include <algorithm>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <memory>
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
struct alignas(8) uint2 { unsigned x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline unsigned __float_as_uint(float v) { unsigned u; std::memcpy(&u, &v, 4); return u; }
inline float __uint_as_float(unsigned u) { float v; std::memcpy(&v, &u, 4); return v; }
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
// Per warp of the running block: a barrier of its threads and the fragments they exchange.
struct WarpFragments { float a[32][4], b[32][2], c[32][4]; unsigned ua[32][4], ub[32][2]; };
inline std::unique_ptr<std::barrier<>>* warp_barriers = nullptr;
inline WarpFragments* warp_fragments = nullptr;

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
          std::vector<std::unique_ptr<std::barrier<>>> warps;
          for (unsigned w0 = 0; w0 < threads; w0 += 32)
            warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - w0)));
          std::vector<WarpFragments> fragments(warps.size());
          warp_barriers = warps.data();
          warp_fragments = fragments.data();
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

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 for the calling thread's warp, from the PTX
// ISA's fragment tables alone (nothing here knows how the kernel maps its data): with
// g = lane / 4, t = lane % 4, lane holds A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4] (a0..a3),
// B[t][g], B[t+4][g] (b0, b1) and C/D[g][2t], [g][2t+1], [g+8][2t], [g+8][2t+1] (c0..c3). The
// tensor cores read TF32: the 13 low mantissa bits of each operand are dropped. The products
// are exact; their sum with C is rounded to fp32 once.
#define FFC_KERNELS_EMULATED_MMA 1
inline float emu_tf32(float v) { return __uint_as_float(__float_as_uint(v) & 0xffffe000u); }
inline void mma_tf32_m16n8k8(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  emu::WarpFragments& f = emu::warp_fragments[warp];
  std::memcpy(f.a[lane], a, sizeof(a));
  std::memcpy(f.b[lane], b, sizeof(b));
  std::memcpy(f.c[lane], d, sizeof(d));
  emu::warp_barriers[warp]->arrive_and_wait();
  float A[16][8], B[8][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    A[g][t] = f.a[l][0]; A[g + 8][t] = f.a[l][1]; A[g][t + 4] = f.a[l][2]; A[g + 8][t + 4] = f.a[l][3];
    B[t][g] = f.b[l][0]; B[t + 4][g] = f.b[l][1];
    C[g][2 * t] = f.c[l][0]; C[g][2 * t + 1] = f.c[l][1];
    C[g + 8][2 * t] = f.c[l][2]; C[g + 8][2 * t + 1] = f.c[l][3];
  }
  const int g = lane / 4, t = lane % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  float out[4];
  for (int i = 0; i < 4; ++i) {
    double sum = C[rows[i]][cols[i]];
    for (int k = 0; k < 8; ++k) sum += double(emu_tf32(A[rows[i]][k])) * double(emu_tf32(B[k][cols[i]]));
    out[i] = float(sum);
  }
  emu::warp_barriers[warp]->arrive_and_wait();  // every lane has read the fragments
  std::memcpy(d, out, sizeof(out));
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, likewise from the ISA's tables: two bf16
// per register, the lower index in the low half; lane holds A[g][2t..2t+1] (a0a1),
// A[g+8][2t..] (a2a3), A[g][2t+8..] (a4a5), A[g+8][2t+8..] (a6a7), B[2t..2t+1][g] (b0b1),
// B[2t+8..2t+9][g] (b2b3); C/D as for m16n8k8. bf16 -> fp32 is exact (bits << 16).
inline float emu_bf16(unsigned half) { return __uint_as_float((half & 0xffffu) << 16); }
inline void mma_bf16_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  emu::WarpFragments& f = emu::warp_fragments[warp];
  std::memcpy(f.ua[lane], a, sizeof(a));
  std::memcpy(f.ub[lane], b, sizeof(b));
  std::memcpy(f.c[lane], d, sizeof(d));
  emu::warp_barriers[warp]->arrive_and_wait();
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * t + e] = emu_bf16(f.ua[l][0] >> (16 * e));
      A[g + 8][2 * t + e] = emu_bf16(f.ua[l][1] >> (16 * e));
      A[g][2 * t + 8 + e] = emu_bf16(f.ua[l][2] >> (16 * e));
      A[g + 8][2 * t + 8 + e] = emu_bf16(f.ua[l][3] >> (16 * e));
      B[2 * t + e][g] = emu_bf16(f.ub[l][0] >> (16 * e));
      B[2 * t + 8 + e][g] = emu_bf16(f.ub[l][1] >> (16 * e));
    }
    C[g][2 * t] = f.c[l][0]; C[g][2 * t + 1] = f.c[l][1];
    C[g + 8][2 * t] = f.c[l][2]; C[g + 8][2 * t + 1] = f.c[l][3];
  }
  const int g = lane / 4, t = lane % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  float out[4];
  for (int i = 0; i < 4; ++i) {
    double sum = C[rows[i]][cols[i]];
    for (int k = 0; k < 16; ++k) sum += double(A[rows[i]][k]) * double(B[k][cols[i]]);
    out[i] = float(sum);
  }
  emu::warp_barriers[warp]->arrive_and_wait();
  std::memcpy(d, out, sizeof(out));
}
inline cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = emu::sm_count;
  return cudaSuccess;
}
"""

EMULATION_ENTRY = r"""
extern "C" void emu_spectral_mix(const void* x, int64_t x_batch_stride, int64_t x_chan_stride,
                                 const float* w, const float* bias, void* out, int B, int Ci,
                                 int Co, int64_t N, bool relu, float weight_scale,
                                 float bias_scale, int sm_count) {
  emu::sm_count = sm_count;
  spectral_mix_launch(static_cast<const float2*>(x), x_batch_stride, x_chan_stride, w, bias,
                      static_cast<float2*>(out), B, Ci, Co, N, relu, nullptr, weight_scale,
                      bias_scale);
}
"""

# The same entry for spectral_mix_mma.cu's TF32 and BF16 kernels (their mma.sync replaced by the
# fake runtime's).
TF32_EMULATION_ENTRY = r"""
extern "C" void emu_spectral_mix(const void* x, int64_t x_batch_stride, int64_t x_chan_stride,
                                 const float* w, const float* bias, void* out, int B, int Ci,
                                 int Co, int64_t N, bool relu, float weight_scale,
                                 float bias_scale, int sm_count) {
  emu::sm_count = sm_count;
  spectral_mix_tf32_launch(static_cast<const float2*>(x), x_batch_stride, x_chan_stride, w,
                           bias, static_cast<float2*>(out), B, Ci, Co, N, relu, weight_scale,
                           bias_scale, nullptr);
}
"""

BF16_EMULATION_ENTRY = TF32_EMULATION_ENTRY.replace("spectral_mix_tf32_launch", "spectral_mix_bf16_launch")


def build_emulation(build: Path, extra_flags=(), source: Path = KERNEL_SOURCE,
                    entry: str = EMULATION_ENTRY) -> Path:
    """Compile a kernel file's own source (spectral_mix.cu by default), its launch rewritten for
    the emulation, with ``entry`` appended, as a shared library."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) for the CPU emulation of the kernel")
    (build / "fake").mkdir(exist_ok=True)
    (build / "fake" / "cuda_runtime.h").write_text(FAKE_CUDA_RUNTIME)
    code, launches = re.subn(r"(\w+<[^<>;]*>)<<<(.*?)>>>", r"emu::launch(\1, \2)",
                             source.read_text(), flags=re.S)
    assert launches == 1, f"expected one kernel launch (kernel<...><<<...>>>) in {source.name}"
    (build / f"{source.stem}_emu.cpp").write_text(code + entry)
    lib = build / f"{source.stem}_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", *extra_flags,
           f"-I{build / 'fake'}", f"-I{CSRC}", str(build / f"{source.stem}_emu.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 and "barrier" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip(f"{cxx} lacks C++20 <barrier>")
    assert proc.returncode == 0, proc.stderr
    return lib


def load_emulation(lib: Path):
    """run(spec, weight, bias, relu, sm_count, weight_scale=1, bias_scale=1) -> out, through the
    emulated kernel."""
    fn = ctypes.CDLL(str(lib)).emu_spectral_mix
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                   ctypes.c_int64, ctypes.c_bool, ctypes.c_float, ctypes.c_float, ctypes.c_int]

    def run(spec, weight, bias, relu, sm_count, weight_scale=1.0, bias_scale=1.0):
        B, Ci, H, Wf = spec.shape
        Co = weight.shape[0] // 2
        weight = weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        out = torch.full((B, Co, H, Wf), float("nan"), dtype=torch.complex64)
        fn(spec.data_ptr(), spec.stride(0), spec.stride(1), weight.data_ptr(),
           None if bias is None else bias.data_ptr(), out.data_ptr(), B, Ci, Co, H * Wf, relu,
           weight_scale, bias_scale, sm_count)
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


def test_emulated_kernel_applies_scales(emulated):
    # The FourierUnit folds its FFT normalisation into weight_scale and bias_scale.
    spec, weight, b = make_case(2, 19, 37, 6, 21)
    for sm_count in TILES.values():
        out = emulated(spec, weight, b, True, sm_count, 0.37, 1.7)
        assert_matches_reference(out, spec, weight * 0.37, b * 1.7, True)


# --- (b') the tensor-core kernels (TF32, BF16), emulated on the CPU --------------------------------
#
# spectral_mix_mma.cu's own source runs under the same emulation, its mma.sync replaced by the
# fake runtime's mma_tf32_m16n8k8 / mma_bf16_m16n8k16, which know nothing of the kernel's data
# mapping: they assemble the warp's A, B and C tiles from the PTX ISA's fragment tables (the TF32
# one dropping each operand's 13 low mantissa bits as the tensor cores do). So this proves the
# kernels' staging, rounding, tile loop and fragment index math (which W and X element each lane
# hands the MMA, and where each accumulator is stored) against the fp64 sum of TF32- or
# BF16-rounded products, to the width of fp32 accumulation. It cannot prove that the emulated fragment tables are the hardware's (they are
# the ISA's, as read here), nor anything about timing: the GPU tests do that.

TF32_CASES = [
    # B, Ci, Co, H, W, bias, relu, strided, weight_scale, bias_scale
    (1, 3, 5, 4, 7, True, True, False, 1.0, 1.0),       # partial tiles everywhere, N = 16 odd rows
    (2, 19, 37, 6, 21, True, False, False, 0.37, 1.7),  # 3 k stages, odd Wf = 11, N = 66
    (3, 10, 70, 12, 41, False, True, False, 1.0, 1.0),  # 2 N tiles, several M tiles, no bias
    (2, 17, 20, 5, 9, True, True, True, 0.25, 0.5),     # strided channel/batch slice, N = 25 odd
]


MMA_ENTRIES = {"tf32": TF32_EMULATION_ENTRY, "bf16": BF16_EMULATION_ENTRY}


@pytest.fixture(scope="module")
def emulated_mma(tmp_path_factory):
    """{precision: run} for spectral_mix_mma.cu's TF32 and BF16 kernels under the emulation."""
    return {precision: load_emulation(build_emulation(tmp_path_factory.mktemp(f"mma_{precision}_emu"),
                                                      source=MMA_SOURCE, entry=entry))
            for precision, entry in MMA_ENTRIES.items()}


def mma_reference(spec, weight, bias, relu, weight_scale, bias_scale, precision):
    """(expected, tolerance) as real (B, 2Co, N) fp64: act(weight_scale * sum of the products of
    operands rounded to ``precision`` + bias_scale * bias), and the most fp32 accumulation and
    the epilogue can move it."""
    from tensor_core_rounding import FP32_UNIT, accumulation_bound, emulated_matmul

    B, Ci, H, Wf = spec.shape
    x = torch.view_as_real(spec).permute(0, 1, 4, 2, 3).reshape(B, 2 * Ci, H * Wf)  # rows 2c + q
    value, magnitude, k = emulated_matmul(weight, x, precision)
    b = torch.zeros(weight.shape[0], 1, dtype=torch.float64) if bias is None else \
        bias.double()[:, None] * bias_scale
    pre = value * weight_scale + b
    tol = accumulation_bound(magnitude, k) * weight_scale + 2 * FP32_UNIT * (b.abs() + pre.abs())
    return (pre.clamp_min(0) if relu else pre), tol


def as_real_rows(out):
    """complex (B, Co, H, Wf) -> real (B, 2Co, N) fp64, row 2o + p = part p of channel o."""
    B, Co, H, Wf = out.shape
    return torch.view_as_real(out).permute(0, 1, 4, 2, 3).reshape(B, 2 * Co, H * Wf).double()


@pytest.mark.parametrize("precision", list(MMA_ENTRIES))
@pytest.mark.parametrize("B,Ci,Co,H,W,bias,relu,strided,ws,bs", TF32_CASES)
def test_emulated_mma_kernel_matches_rounded_reference(emulated_mma, precision, B, Ci, Co, H, W,
                                                       bias, relu, strided, ws, bs):
    spec, weight, b = make_case(B, Ci, Co, H, W, bias=bias, strided=strided)
    out = emulated_mma[precision](spec, weight, b, relu, 1, ws, bs)  # one tile whatever the SM count
    expected, tol = mma_reference(spec, weight, b, relu, ws, bs, precision)
    err = (as_real_rows(out) - expected).abs()
    assert (err <= tol).all(), f"{(err > tol).sum().item()} outside; worst err/tol {(err / tol).max().item():.3g}"
    # The band is narrow enough to tell rounded from fp32 products: unrounded fp64 products land
    # outside it somewhere, so a kernel that skipped (or truncated instead of) rounding would fail.
    from ffc_kernels.ops.spectral_mix import spectral_mix_reference

    exact = spectral_mix_reference(spec.to(torch.complex128), weight.double() * ws,
                                   None if b is None else b.double() * bs, relu)
    assert ((as_real_rows(exact) - expected).abs() > tol).any()


@pytest.mark.parametrize("precision", list(MMA_ENTRIES))
def test_emulated_mma_kernel_relu_passes_nan(emulated_mma, precision):
    spec, weight, b = make_case(1, 2, 3, 3, 4)
    spec[0, 1, 2, 1] = complex(float("nan"), 0.0)
    out = emulated_mma[precision](spec, weight, b, True, TILES["small_tile"])
    assert out[0, :, 2, 1].real.isnan().all() and out[0, :, 2, 1].imag.isnan().all()
    assert not out[0, :, 2, 2].real.isnan().any()


# --- (b'') the FourierUnit's host code (plans, layouts, in-place C2R) with a stand-in cuFFT ---------
#
# fourier_unit.cpp compiled with g++ against a stand-in cufft.h that keeps each plan's advanced
# layout and executes it as a direct fp64 DFT on host memory, element (batch b, index h, w) at
# b * dist + (h * embed[1] + w) * stride as cuFFT's documentation defines it, together with the
# emulated mix kernels. That proves the plan parameters (distances, padded in-place rows,
# batch-by-batch execs for strided input), the offsets, the folded FFT normalisation and the
# plan cache end to end against LaMa's FourierUnit. It cannot prove cuFFT's own behaviour (its
# in-place C2R, alignment rules): the GPU tests do.

FAKE_CUFFT = r"""
#pragma once
#include <cmath>
#include <complex>
#include <map>
#include <vector>
#include <cuda_runtime.h>

using cufftHandle = int;
using cufftReal = float;
using cufftComplex = float2;
enum cufftResult { CUFFT_SUCCESS = 0, CUFFT_INVALID_PLAN = 1, CUFFT_INVALID_VALUE = 4 };
enum cufftType { CUFFT_R2C = 0x2a, CUFFT_C2R = 0x2c };

namespace fake_cufft {
struct Plan {
  long long n[2], inembed[2], istride, idist, onembed[2], ostride, odist, batch;
  cufftType type;
  bool auto_allocate = true, made = false;
  void* work = nullptr;
  cudaStream_t stream = nullptr;
};
inline std::map<int, Plan> plans;
inline int next_handle = 1;
inline int execs = 0;
constexpr size_t kWorkBytes = 64;
}  // namespace fake_cufft

inline cufftResult cufftCreate(cufftHandle* h) {
  *h = fake_cufft::next_handle++;
  fake_cufft::plans[*h] = {};
  return CUFFT_SUCCESS;
}
inline cufftResult cufftDestroy(cufftHandle h) {
  return fake_cufft::plans.erase(h) ? CUFFT_SUCCESS : CUFFT_INVALID_PLAN;
}
inline cufftResult cufftSetAutoAllocation(cufftHandle h, int a) {
  fake_cufft::plans.at(h).auto_allocate = a != 0;
  return CUFFT_SUCCESS;
}
inline cufftResult cufftSetStream(cufftHandle h, cudaStream_t s) {
  fake_cufft::plans.at(h).stream = s;
  return CUFFT_SUCCESS;
}
inline cufftResult cufftSetWorkArea(cufftHandle h, void* w) {
  fake_cufft::plans.at(h).work = w;
  return CUFFT_SUCCESS;
}
inline cufftResult cufftMakePlanMany64(cufftHandle h, int rank, long long* n, long long* inembed,
                                       long long istride, long long idist, long long* onembed,
                                       long long ostride, long long odist, cufftType type,
                                       long long batch, size_t* work) {
  if (rank != 2 || !inembed || !onembed || batch < 1 || n[0] < 1 || n[1] < 1) return CUFFT_INVALID_VALUE;
  fake_cufft::Plan& p = fake_cufft::plans.at(h);
  p.n[0] = n[0]; p.n[1] = n[1];
  p.inembed[0] = inembed[0]; p.inembed[1] = inembed[1];
  p.onembed[0] = onembed[0]; p.onembed[1] = onembed[1];
  p.istride = istride; p.idist = idist; p.ostride = ostride; p.odist = odist;
  p.type = type; p.batch = batch; p.made = true;
  *work = fake_cufft::kWorkBytes;
  return CUFFT_SUCCESS;
}

namespace fake_cufft {
inline cufftResult check(const Plan& p, cufftType type) {
  if (!p.made || p.type != type || (!p.auto_allocate && p.work == nullptr)) return CUFFT_INVALID_VALUE;
  ++execs;
  return CUFFT_SUCCESS;
}
}  // namespace fake_cufft

// Unnormalised forward transform of each real (H, W) array to its H x (W/2 + 1) half spectrum.
inline cufftResult cufftExecR2C(cufftHandle h, cufftReal* in, cufftComplex* out) {
  const fake_cufft::Plan& p = fake_cufft::plans.at(h);
  if (cufftResult r = fake_cufft::check(p, CUFFT_R2C)) return r;
  const long long H = p.n[0], W = p.n[1], Wf = W / 2 + 1;
  const double two_pi = 2 * std::acos(-1.0);
  for (long long b = 0; b < p.batch; ++b) {
    std::vector<double> x(H * W);
    for (long long i = 0; i < H; ++i)
      for (long long j = 0; j < W; ++j)
        x[i * W + j] = in[b * p.idist + (i * p.inembed[1] + j) * p.istride];
    for (long long u = 0; u < H; ++u)
      for (long long v = 0; v < Wf; ++v) {
        std::complex<double> sum = 0;
        for (long long i = 0; i < H; ++i)
          for (long long j = 0; j < W; ++j)
            sum += x[i * W + j] * std::polar(1.0, -two_pi * (double(u * i % H) / H + double(v * j % W) / W));
        out[b * p.odist + (u * p.onembed[1] + v) * p.ostride] = {float(sum.real()), float(sum.imag())};
      }
  }
  return CUFFT_SUCCESS;
}

// Unnormalised inverse: a complex inverse DFT over H, then a real one over W that reads the
// real part only of frequencies 0 and W/2 (what a C2R does with a non-Hermitian input). All of
// an array is read before any of it is written, so in place works.
inline cufftResult cufftExecC2R(cufftHandle h, cufftComplex* in, cufftReal* out) {
  const fake_cufft::Plan& p = fake_cufft::plans.at(h);
  if (cufftResult r = fake_cufft::check(p, CUFFT_C2R)) return r;
  const long long H = p.n[0], W = p.n[1], Wf = W / 2 + 1;
  const double two_pi = 2 * std::acos(-1.0);
  for (long long b = 0; b < p.batch; ++b) {
    std::vector<std::complex<double>> y(H * Wf);
    for (long long i = 0; i < H; ++i)
      for (long long v = 0; v < Wf; ++v) {
        std::complex<double> sum = 0;
        for (long long u = 0; u < H; ++u) {
          const float2 c = in[b * p.idist + (u * p.inembed[1] + v) * p.istride];
          sum += std::complex<double>(c.x, c.y) * std::polar(1.0, two_pi * double(u * i % H) / H);
        }
        y[i * Wf + v] = sum;
      }
    for (long long i = 0; i < H; ++i)
      for (long long j = 0; j < W; ++j) {
        double sum = y[i * Wf].real();
        for (long long v = 1; v < Wf; ++v) {
          const double part = (y[i * Wf + v] * std::polar(1.0, two_pi * double(v * j % W) / W)).real();
          sum += (2 * v == W) ? part : 2 * part;
        }
        out[b * p.odist + (i * p.onembed[1] + j) * p.ostride] = float(sum);
      }
  }
  return CUFFT_SUCCESS;
}
"""

FU_EMULATION_ENTRY = r"""
#include <vector>
#include "fourier_unit.h"

extern "C" const char* emu_fourier_unit(const float* x, int64_t B, int64_t Ci, int64_t Co,
                                        int64_t H, int64_t W, int64_t x_batch_stride,
                                        int64_t x_chan_stride, const float* w, const float* bias,
                                        bool relu, float weight_scale, float bias_scale, int precision,
                                        void* spec, void* out, void* stream, int sm_count) {
  emu::sm_count = sm_count;
  const FourierUnitShape shape{B, Ci, Co, H, W, x_batch_stride, x_chan_stride};
  size_t work_bytes = 0;
  if (const char* err = fourier_unit_prepare(shape, static_cast<cudaStream_t>(stream), &work_bytes)) return err;
  std::vector<char> work(work_bytes);
  return fourier_unit_launch(shape, x, w, bias, relu, weight_scale, bias_scale,
                             static_cast<MixPrecision>(precision),
                             static_cast<float2*>(spec), static_cast<float2*>(out),
                             work.empty() ? nullptr : work.data(), static_cast<cudaStream_t>(stream));
}

extern "C" size_t emu_cached_plans() { return fourier_unit_cached_plans(); }
extern "C" int emu_cufft_execs() { return fake_cufft::execs; }
"""


@pytest.fixture(scope="module")
def emulated_fourier_unit(tmp_path_factory):
    """run(x, weight, bias, fft_norm, precision, stream=0, sm_count=1) -> fp32 (B, Co, H, W) view,
    through fourier_unit.cpp, both emulated mix kernels and the stand-in cuFFT, with the scales
    the binding derives; and the library (for its plan and exec counters)."""
    import numpy as np

    build = tmp_path_factory.mktemp("fourier_unit_emu")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) for the CPU emulation")
    objs = []
    for source in (KERNEL_SOURCE, MMA_SOURCE):
        # Objects (-c) to link with the host code; their entries are left out (both are named
        # emu_spectral_mix).
        lib = build_emulation(build, ["-c"], source=source, entry="")
        objs.append(lib)
    (build / "fake" / "cufft.h").write_text(FAKE_CUFFT)
    (build / "fourier_unit_entry.cpp").write_text(
        '#include "cufft.h"\n' + (CSRC / "fourier_unit.cpp").read_text() + FU_EMULATION_ENTRY)
    lib = build / "fourier_unit_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", f"-I{build / 'fake'}", f"-I{CSRC}",
           str(build / "fourier_unit_entry.cpp"), *map(str, objs), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    dll = ctypes.CDLL(str(lib))
    fn = dll.emu_fourier_unit
    fn.restype = ctypes.c_char_p
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, ctypes.c_bool, ctypes.c_float,
                   ctypes.c_float, ctypes.c_int, ptr, ptr, ptr, ctypes.c_int]
    mix_precision = {"fp32": 0, "tf32": 1, "bf16": 2}  # MixPrecision's order in fourier_unit.h
    dll.emu_cached_plans.restype = ctypes.c_size_t
    scales = {"ortho": lambda hw: (1 / hw, 1 / np.sqrt(hw)), "backward": lambda hw: (1 / hw, 1 / hw),
              "forward": lambda hw: (1 / hw, 1.0)}

    def run(x, weight, bias, fft_norm, precision, stream=0, sm_count=1):
        B, Ci, H, W = x.shape
        Co = weight.shape[0] // 2
        assert x.stride(3) == 1 and x.stride(2) == W
        weight = weight.reshape(2 * Co, 2 * Ci).contiguous()
        bias = None if bias is None else bias.contiguous()
        ws, bs = scales[fft_norm](H * W)
        spec = torch.full((B, Ci, H, W // 2 + 1), float("nan"), dtype=torch.complex64)
        out = torch.full((B, Co, H, 2 * (W // 2 + 1)), float("nan"))
        err = fn(x.data_ptr(), B, Ci, Co, H, W, x.stride(0), x.stride(1), weight.data_ptr(),
                 None if bias is None else bias.data_ptr(), True, ws, bs, mix_precision[precision],
                 spec.data_ptr(), out.data_ptr(), stream, sm_count)
        assert err is None, err.decode()
        return out[..., :W]

    return run, dll


FU_EMULATED_CASES = [
    # B, Ci, Co, H, W, fft_norm, layout
    (1, 4, 6, 6, 8, "ortho", "contiguous"),
    (2, 5, 3, 5, 9, "ortho", "strided"),        # odd H, W: B separate R2C execs
    (3, 6, 6, 4, 7, "backward", "contiguous"),  # one R2C exec of batch B * Ci
    (2, 1, 4, 6, 5, "forward", "strided"),      # Ci = 1: one exec over batches
    (1, 3, 20, 3, 10, "ortho", "strided"),      # B = 1: one exec, any batch stride
]


def _fu_case(B, Ci, Co, H, W, fft_norm, layout, seed=0):
    from ffc_kernels.fold import batchnorm_affine, fold
    from ffc_kernels.reference import FourierUnit
    from helpers import randomize_batchnorm

    torch.manual_seed(seed)
    unit = randomize_batchnorm(FourierUnit(Ci, Co, fft_norm=fft_norm), seed).eval()
    w, b = fold(unit.conv_layer.weight, batchnorm_affine(unit.bn))
    if layout == "strided":
        x = torch.randn(B * 2, Ci + 2, H, W, dtype=torch.float64)[::2, 1:1 + Ci]
    else:
        x = torch.randn(B, Ci, H, W, dtype=torch.float64)
    return unit, w.detach().float(), b.detach().float(), x


# Relative L2 error bands against fp64 for the tensor-core mixes: above what fp32 makes (so the
# MMA path ran, rounding), within a few units of the format's roundoff (TF32 2^-11, BF16 2^-8).
MMA_ERROR_BANDS = {"tf32": (1e-6, 2e-3), "bf16": (1e-4, 1.6e-2)}


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("B,Ci,Co,H,W,fft_norm,layout", FU_EMULATED_CASES)
def test_emulated_fourier_unit_matches_lama(emulated_fourier_unit, fp32, precision, B, Ci, Co, H, W,
                                            fft_norm, layout):
    import copy

    from helpers import assert_close_to_reference

    run, _ = emulated_fourier_unit
    unit, w, b, x = _fu_case(B, Ci, Co, H, W, fft_norm, layout)
    assert (x.stride(0) != Ci * H * W) == (layout == "strided")
    with torch.no_grad():
        exact = copy.deepcopy(unit).double()(x)
        plain = copy.deepcopy(unit)(x.float())
    for sm_count in TILES.values():
        out = run(x.float(), w, b, fft_norm, precision, sm_count=sm_count)
        if precision == "fp32":
            assert_close_to_reference(out, exact, plain)
        else:
            err = ((out.double() - exact).norm() / exact.norm()).item()
            low, high = MMA_ERROR_BANDS[precision]
            assert low < err <= high, err


def test_emulated_fourier_unit_caches_plans_per_shape_and_stream(emulated_fourier_unit):
    run, dll = emulated_fourier_unit
    _, w, b, x = _fu_case(2, 3, 3, 4, 6, "ortho", "contiguous", seed=1)
    plans, execs = dll.emu_cached_plans(), dll.emu_cufft_execs()
    first = run(x.float(), w, b, "ortho", "fp32")
    assert dll.emu_cached_plans() == plans + 2 and dll.emu_cufft_execs() == execs + 2
    assert torch.equal(run(x.float(), w, b, "ortho", "fp32"), first)
    assert dll.emu_cached_plans() == plans + 2  # found, not re-made
    run(x.float(), w, b, "ortho", "fp32", stream=0x1234)  # another stream: its own plans
    assert dll.emu_cached_plans() == plans + 4
    strided = torch.stack([x, 0 * x], 1).flatten(0, 1).float()[::2]  # x again, batch stride 2 Ci H W
    execs = dll.emu_cufft_execs()
    assert torch.equal(run(strided, w, b, "ortho", "fp32"), first)
    assert dll.emu_cufft_execs() == execs + 2 + 1  # 2 R2C execs, 1 C2R


def test_emulated_kernel_stays_in_bounds(tmp_path):
    """Every emulated case again under AddressSanitizer, for every kernel (SIMT, TF32, BF16): their
    masks must keep their loads inside the input tensors, whose allocations end exactly at their
    last element (results cannot show an over-read: positions past N only feed outputs that are
    never stored)."""
    libasan = subprocess.run([shutil.which("g++") or "g++", "-print-file-name=libasan.so"],
                             capture_output=True, text=True).stdout.strip()
    if not Path(libasan).is_absolute():
        pytest.skip("no AddressSanitizer runtime (libasan.so) for g++")
    asan = ["-fsanitize=address", "-fno-omit-frame-pointer"]
    libs = [build_emulation(tmp_path, asan)]
    for precision, entry in MMA_ENTRIES.items():
        (tmp_path / precision).mkdir()
        libs.append(build_emulation(tmp_path / precision, asan, source=MMA_SOURCE, entry=entry))
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_csrc as t
for lib in {[str(lib) for lib in libs]!r}:
    run = t.load_emulation(lib)
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
        cflags, ldflags = cufft_flags(CUDA_HOME)
        module = cpp_extension.load(
            name="ffc_kernels_csrc_test",
            sources=[str(CSRC / name) for name in EXTENSION_SOURCES],
            extra_cflags=["-O3", *cflags],
            extra_cuda_cflags=["-O3", "-gencode=arch=compute_90,code=sm_90",
                               "-gencode=arch=compute_80,code=sm_80"],
            extra_ldflags=ldflags,
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


def _fu_rejects(ext, message, x, weight, bias=None, fft_norm="ortho", precision="tf32"):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        ext.fourier_unit(x, weight, bias, True, fft_norm, precision)


def test_extension_has_fourier_unit(built_ext):
    assert callable(built_ext.fourier_unit) and "FourierUnit" in built_ext.fourier_unit.__doc__
    assert built_ext.fourier_unit_cached_plans() == 0  # nothing planned before a CUDA call


def test_fourier_unit_checks_arguments(built_ext):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g)
    weight, bias = torch.randn(8, 6, generator=g), torch.randn(8, generator=g)
    _fu_rejects(built_ext, "x must be float32, got Double", x.double(), weight)
    _fu_rejects(built_ext, "x must be 4-D (B, Ci, H, W), got 3-D", x[0], weight)
    _fu_rejects(built_ext, "weight must be float32", x, weight.double())
    _fu_rejects(built_ext, "weight must be LaMa's (2 * Co, 2 * Ci) = (2 * Co, 6)", x, weight[:, :4])
    _fu_rejects(built_ext, "weight must be LaMa's (2 * Co, 2 * Ci) = (2 * Co, 6)", x, weight[:7])
    _fu_rejects(built_ext, "weight must be LaMa's", x, weight.reshape(8, 6, 1).expand(8, 6, 2))
    _fu_rejects(built_ext, "bias must be 1-D of size 2 * Co = 8", x, weight, bias[:6])
    _fu_rejects(built_ext, 'fft_norm must be "ortho", "backward" or "forward", got "unitary"', x, weight,
                fft_norm="unitary")
    _fu_rejects(built_ext, 'precision must be "tf32" or "bf16" (tensor cores) or "fp32"', x, weight,
                precision="fp16")
    _fu_rejects(built_ext, "x's spatial dims (H, W) must be contiguous", x.transpose(2, 3), weight)
    _fu_rejects(built_ext, "x must be a CUDA tensor, got device cpu", x, weight, bias)
    # LaMa's conv-shaped weight and strided batches/channels pass every layout check.
    big = torch.randn(4, 6, 5, 8, generator=g)
    _fu_rejects(built_ext, "x must be a CUDA tensor", big[::2, 1:4], weight.reshape(8, 6, 1, 1), bias,
                fft_norm="backward", precision="fp32")


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


FU_GPU_CASES = [
    # B, Ci, Co, H, W, fft_norm, strided
    (1, 4, 4, 8, 8, "ortho", False),
    (2, 5, 7, 9, 11, "ortho", True),       # odd H and W (Wf = 6), batch and channel slice
    (3, 17, 20, 12, 15, "backward", False),
    (2, 6, 3, 7, 10, "forward", True),
    (1, 192, 192, 64, 64, "ortho", False),  # big-lama's FourierUnit at 512^2
    (2, 192, 192, 128, 128, "ortho", False),  # at 1024^2, batch 2 (where a larger MMA tile was 8% off)
]


def lama_fourier_unit_case(B, Ci, Co, H, W, fft_norm, strided, seed=0):
    """A LaMa FourierUnit (random BatchNorm, eval), its folded (2Co, 2Ci, 1, 1) weight and (2Co,)
    bias in fp32, and an fp64 CUDA input, a batch-and-channel slice of a larger one if strided."""
    from ffc_kernels.fold import batchnorm_affine, fold
    from ffc_kernels.reference import FourierUnit
    from helpers import randomize_batchnorm

    torch.manual_seed(seed)
    unit = randomize_batchnorm(FourierUnit(Ci, Co, fft_norm=fft_norm), seed).eval()
    w, b = fold(unit.conv_layer.weight, batchnorm_affine(unit.bn))
    x = torch.randn(2 * B if strided else B, Ci + (3 if strided else 0), H, W, dtype=torch.float64,
                    device="cuda")
    if strided:
        x = x[::2, 2:2 + Ci]
    return unit, w.detach().float().cuda(), b.detach().float().cuda(), x


def relative_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("B,Ci,Co,H,W,fft_norm,strided", FU_GPU_CASES)
def test_gpu_fourier_unit_matches_lama(built_ext, fp32, B, Ci, Co, H, W, fft_norm, strided):
    """fp32: within 4x plain fp32 torch's error against fp64 (TF32 off). tf32 and bf16: relative L2
    error within 2e-3 and 1.6e-2 (unit roundoffs 2^-11 = 4.9e-4 and 2^-8 = 3.9e-3), and larger
    than the more precise path's, which shows that each ran."""
    import copy

    from helpers import assert_close_to_reference

    unit, w, b, x = lama_fourier_unit_case(B, Ci, Co, H, W, fft_norm, strided)
    if strided:
        assert not x.is_contiguous()
    with torch.no_grad():
        exact = copy.deepcopy(unit).double().cuda()(x)
        plain = copy.deepcopy(unit).cuda()(x.float())
    fast32 = built_ext.fourier_unit(x.float(), w, b, True, fft_norm, "fp32")
    fast_tf32 = built_ext.fourier_unit(x.float(), w, b, True, fft_norm, "tf32")
    fast_bf16 = built_ext.fourier_unit(x.float(), w, b, True, fft_norm, "bf16")
    torch.cuda.synchronize()
    for fast in (fast32, fast_tf32, fast_bf16):
        assert fast.shape == (B, Co, H, W) and fast.dtype == torch.float32
        # C2R ran in place on the mix's buffer: rows padded to 2 (W // 2 + 1) floats.
        wf2 = 2 * (W // 2 + 1)
        assert fast.stride() == (Co * H * wf2, H * wf2, wf2, 1)
    assert_close_to_reference(fast32, exact, plain)
    err_fp32, err_tf32, err_bf16 = (relative_l2(f, exact) for f in (fast32, fast_tf32, fast_bf16))
    assert err_tf32 <= 2e-3 and err_bf16 <= 1.6e-2, (err_tf32, err_bf16)
    assert err_bf16 > 2 * err_tf32 > 8 * err_fp32, (err_bf16, err_tf32, err_fp32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fourier_unit_caches_plans_per_shape_and_stream(built_ext, fp32):
    import copy

    unit, w, b, x = lama_fourier_unit_case(2, 8, 8, 16, 20, "ortho", False)
    x = x.float()
    before = built_ext.fourier_unit_cached_plans()
    first = built_ext.fourier_unit(x, w, b, True, "ortho", "fp32")
    assert built_ext.fourier_unit_cached_plans() == before + 2  # one R2C, one C2R
    again = built_ext.fourier_unit(x, w, b, True, "ortho", "fp32")
    assert built_ext.fourier_unit_cached_plans() == before + 2
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        on_stream = built_ext.fourier_unit(x, w, b, True, "ortho", "fp32")
    stream.synchronize()
    assert built_ext.fourier_unit_cached_plans() == before + 4  # plans bound to the new stream
    assert torch.equal(first, again)
    assert (first - on_stream).abs().max().item() <= 1e-6
    with torch.no_grad():
        plain = copy.deepcopy(unit).cuda()(x)
    assert (first - plain).abs().max().item() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_gpu_op_dispatches_to_csrc_fourier_unit(built_ext, fp32, monkeypatch, precision):
    """ops.fourier_unit under FFC_KERNELS_BACKEND=cuda runs csrc's FourierUnit (recorded), with the
    precision it was given; with gradients to record it takes the spectral_mix path instead."""
    import copy

    from ffc_kernels import _ext
    from ffc_kernels.ops.fourier_unit import fourier_unit
    from ffc_kernels.ops.spectral_mix import pack_bias, pack_weight

    monkeypatch.setattr(_ext, "_C", built_ext)
    monkeypatch.setattr(_ext, "_WHY", None)
    monkeypatch.setenv("FFC_KERNELS_BACKEND", "cuda")
    calls = []
    real = _ext.fourier_unit_packed
    monkeypatch.setattr(_ext, "fourier_unit_packed", lambda *args: calls.append(args[-1]) or real(*args))

    unit, w, b, x = lama_fourier_unit_case(2, 6, 5, 9, 13, "ortho", True)
    x = x.float().contiguous(memory_format=torch.channels_last)  # the op packs the planes
    packed_w, packed_b = pack_weight(w), pack_bias(b)
    with torch.no_grad():
        out = fourier_unit(x, packed_w, packed_b, fft_norm="ortho", precision=precision)
        exact = copy.deepcopy(unit).double().cuda()(x.double())
    assert calls == [precision]
    assert relative_l2(out, exact) <= {"fp32": 1e-5, "tf32": 2e-3, "bf16": 1.6e-2}[precision]
    # Without a precision the op follows cuDNN's TF32 switch (off under the fp32 fixture).
    with torch.no_grad():
        fourier_unit(x, packed_w, packed_b)
    assert calls[-1] == "fp32"
    # Autograd needs the spectral_mix path (csrc's FourierUnit has no backward).
    calls.clear()
    out = fourier_unit(x.requires_grad_(), packed_w, packed_b, precision=precision)
    assert calls == [] and out.requires_grad


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
