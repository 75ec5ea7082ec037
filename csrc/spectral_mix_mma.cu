// spectral_mix_mma: the spectral mix of spectral_mix.cu on tensor cores with fp32 accumulation,
// TF32 operands (mma.sync.m16n8k8) or BF16 operands (mma.sync.m16n8k16), for the CUDA
// FourierUnit (fourier_unit.cpp).
//
// Same GEMM, out_b (2Co x N) = W (2Co x 2Ci) @ X_b (2Ci x N) over LaMa's stacked re/im channels,
// read from and written to complex64 in place. The trick that makes it cheap: the order of
// rows of A and of the reduction index inside one m16n8k8 tile is free (any permutation applied
// to both operands gives the same sum), so both are chosen to match complex64's interleaving.
// With g = lane / 4 and t = lane % 4 (the PTX ISA's groupID and threadID_in_group), and one
// tile covering 8 complex output channels o0 + 0..7 and 4 complex input channels c0 + 0..3:
//   A row g      = W row 2(o0 + g)     (Re out), A row g + 8 = W row 2(o0 + g) + 1 (Im out)
//   A col t      = W col 2(c0 + t)     (Re in),  A col t + 4 = W col 2(c0 + t) + 1 (Im in)
// so a thread's A fragment (a0, a1, a2, a3) = (W[2o][2c], W[2o+1][2c], W[2o][2c+1],
// W[2o+1][2c+1]) for o = o0 + g, c = c0 + t: one float4 of the weight regrouped as in
// spectral_mix.cu; its B fragment (b0, b1) = (Re, Im) x[c0 + t, n0 + g]: one float2 of the
// spectrum; and its accumulators (d0, d1, d2, d3) = (Re, Re, Im, Im) of out[o0 + g] at
// positions n0 + 2t, n0 + 2t + 1: two complex64 outputs. No shuffles, no de-interleaving pass.
//
// BF16 (m16n8k16, 8 complex input channels per tile) packs two operands per register, lower
// index in the low half, and the same choice works: with c = c0 + t and c' = c + 4,
//   A regs (a0a1, a2a3, a4a5, a6a7) = (W[2o][2c], W[2o][2c+1]), (W[2o+1][2c], W[2o+1][2c+1]),
//                                     and the same for c'
//   B regs (b0b1, b2b3)             = (Re, Im) x[c, n0 + g], (Re, Im) x[c', n0 + g]
// so each is a bf16x2 of one complex input or of one weight row pair, staged that way.
//
// Operands are rounded (to nearest, ties to even, NaN kept) once, while staging into shared
// memory, so the tensor cores see exactly round_tf32 / round_bf16 of the inputs (as
// tests/tensor_core_rounding.py models) rather than truncated fp32. weight_scale multiplies
// the fp32 accumulator in the epilogue (it is not folded into W before rounding), then
// bias * bias_scale is added and ReLU applied.
//
// Block tile BM complex output channels x BN positions, BK complex input channels per stage,
// double-buffered as in spectral_mix.cu; output-channel tiles vary fastest in the flat grid, so
// the blocks that share an input tile run together and it is read from HBM once.
#include "spectral_mix.h"

#include <algorithm>

namespace {

template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int MIN_BLOCKS_>
struct MmaTile {
  static constexpr int BM = BM_;  // complex output channels per block
  static constexpr int BN = BN_;  // spatial positions per block
  static constexpr int BK = BK_;  // complex input channels per shared-memory stage
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M;  // complex output channels per warp
  static constexpr int WN = BN / WARPS_N;  // positions per warp
  static constexpr int MT = WM / 8;        // m16 tiles per warp (8 complex channels each)
  static constexpr int NT = WN / 8;        // n8 tiles per warp
  static constexpr int X_LOADS = BK * BN / THREADS;  // float2 per thread per stage
  static constexpr int X_THREADS_PER_ROW = BN / X_LOADS;
  static constexpr int W_LOADS = (BM * BK + THREADS - 1) / THREADS;  // 2x2 weight blocks
  static_assert(WM % 8 == 0 && WN % 8 == 0 && BK % 8 == 0, "whole MMA tiles per warp");
  static_assert(THREADS * X_LOADS == BK * BN && BN % X_LOADS == 0, "X tile must split evenly");
};

// 16 fp32 accumulators per thread, three blocks per SM (four would cap it at 64 registers, and
// it spills 8 bytes on sm_80). The only tile: a 64 x 128 tile (2 x 4 warps of 32 x 32) was exact
// under the CPU emulation at every shape, LaMa's included, yet off by 8% (relative L2, TF32 and
// BF16 alike) on an H100 and an H200 at B = 2, 192 -> 192 channels, 128 x 65 positions, while
// this tile was right there; it stays out until that is understood on a GPU.
using MmaTileConfig = MmaTile<16, 128, 8, 1, 8, 3>;

// fp32 -> TF32 bit pattern, round to nearest even; NaN stays NaN (a NaN with only low mantissa
// bits set would otherwise round to infinity).
__device__ __forceinline__ float round_tf32(float v) {
  const unsigned bits = __float_as_uint(v);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return __uint_as_float(0x7fc00000u | (bits & 0x80000000u));
  return __uint_as_float((bits + 0xfffu + ((bits >> 13) & 1u)) & 0xffffe000u);
}

// fp32 -> BF16 bit pattern (low 16 bits), round to nearest even; NaN stays NaN.
__device__ __forceinline__ unsigned bf16_bits(float v) {
  const unsigned bits = __float_as_uint(v);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u | ((bits >> 16) & 0x8000u);
  return (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
}

__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
  return bf16_bits(lo) | (bf16_bits(hi) << 16);
}

// What shared memory holds per complex input (X) and per 2x2 weight block (W), and how many
// complex input channels one MMA consumes. Row pitches are padded so that a fragment load
// touches every bank once (both 8 banks mod 32) and the staging stores stay conflict-free.
struct Tf32Operands {
  static constexpr bool BF16 = false;
  static constexpr int K_CHANNELS = 4;
  using XElem = float2;  // (Re, Im) x[c][n], TF32-rounded
  using WElem = float4;  // (W[2o][2c], W[2o][2c+1], W[2o+1][2c], W[2o+1][2c+1]), TF32-rounded
  static constexpr int XS_PAD = 4, WS_PAD = 2;
  static __device__ __forceinline__ XElem x(float2 v) {
    return make_float2(round_tf32(v.x), round_tf32(v.y));
  }
  static __device__ __forceinline__ WElem w(float2 re_row, float2 im_row) {
    return make_float4(round_tf32(re_row.x), round_tf32(re_row.y), round_tf32(im_row.x),
                       round_tf32(im_row.y));
  }
};

struct Bf16Operands {
  static constexpr bool BF16 = true;
  static constexpr int K_CHANNELS = 8;
  using XElem = unsigned;  // bf16x2 (Re, Im) x[c][n]
  using WElem = uint2;     // bf16x2 (W[2o][2c], W[2o][2c+1]), bf16x2 (W[2o+1][2c], W[2o+1][2c+1])
  static constexpr int XS_PAD = 8, WS_PAD = 4;
  static __device__ __forceinline__ XElem x(float2 v) { return pack_bf16x2(v.x, v.y); }
  static __device__ __forceinline__ WElem w(float2 re_row, float2 im_row) {
    return make_uint2(pack_bf16x2(re_row.x, re_row.y), pack_bf16x2(im_row.x, im_row.y));
  }
};

#ifndef FFC_KERNELS_EMULATED_MMA
// d += a @ b for one 16x8x8 TF32 tile held by the warp (PTX ISA, mma.m16n8k8 .tf32 fragments).
__device__ __forceinline__ void mma_tf32_m16n8k8(float (&d)[4], const float (&a)[4],
                                                 const float (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])),
        "r"(__float_as_uint(a[3])), "r"(__float_as_uint(b[0])), "r"(__float_as_uint(b[1])));
}

// d += a @ b for one 16x8x16 BF16 tile (mma.m16n8k16 .bf16 fragments, two per register).
__device__ __forceinline__ void mma_bf16_m16n8k16(float (&d)[4], const unsigned (&a)[4],
                                                  const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

template <class Cfg, class Op, bool RELU>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MIN_BLOCKS)
    _spectral_mix_mma_kernel(const float2* __restrict__ x, int64_t x_batch_stride,
                              int64_t x_chan_stride, const float* __restrict__ w,
                              const float* __restrict__ bias, float2* __restrict__ out, int Ci,
                              int Co, int64_t N, float weight_scale, float bias_scale) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, MT = Cfg::MT, NT = Cfg::NT;

  using XElem = typename Op::XElem;
  using WElem = typename Op::WElem;
  static_assert((BN + Op::XS_PAD) * sizeof(XElem) / 4 % 32 == 8 &&
                    (BM + Op::WS_PAD) * sizeof(WElem) / 4 % 32 == 8,
                "row pitches of 8 banks mod 32 (conflict-free fragment loads)");
  __shared__ XElem xs[2][BK][BN + Op::XS_PAD];
  __shared__ WElem ws[2][BK][BM + Op::WS_PAD];  // ws[s][c][o]: the 2x2 block (o, c)

  const int tid = threadIdx.x;
  const int lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int warp_m = warp / Cfg::WARPS_N, warp_n = warp % Cfg::WARPS_N;
  // Flat grid, output-channel tiles fastest.
  const int m_tiles = (Co + BM - 1) / BM;
  const int m0 = static_cast<int>(blockIdx.x % m_tiles) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x / m_tiles) * BN;
  const int64_t b = blockIdx.y;
  x += b * x_batch_stride;
  out += b * Co * N;
  const int64_t w_cols = 2 * static_cast<int64_t>(Ci);

  // X staging: a warp copies contiguous float2 of one input channel.
  constexpr int X_STEP = Cfg::X_THREADS_PER_ROW;
  const int x_row = tid / X_STEP;
  const int x_col = tid % X_STEP;
  const int64_t x_n = n0 + x_col;
  const float2* x_src = x + x_row * x_chan_stride + x_n;
  // Which of this thread's X positions exist, as bits: fewer live 64-bit values in the k loop.
  unsigned x_in_range = 0;
#pragma unroll
  for (int r = 0; r < Cfg::X_LOADS; ++r) x_in_range |= (x_n + r * X_STEP < N ? 1u : 0u) << r;

  float2 x_reg[Cfg::X_LOADS];

  // W staging: item i is the 2x2 block (c, o) with c = i % 4 + 4 (i / 4BM), o = i / 4 % BM, so
  // the 8 lanes of a 16-byte shared store cover 4 c x 2 o, one bank group each.
  auto w_item = [](int i, int& c, int& o) {
    c = i % 4 + 4 * (i / (4 * BM));
    o = i / 4 % BM;
  };

  // The next stage's X (the bulk of the bytes) is loaded into registers before the current
  // stage computes; W (a few KB, L2-resident) is loaded when it is stored, so its registers
  // are not live across the MMAs.
  // Out-of-range channels and positions load zeros in both operands: exact zeros in the sums.
  auto load_x = [&](int k0) {
    const bool c_valid = k0 + x_row < Ci;
#pragma unroll
    for (int r = 0; r < Cfg::X_LOADS; ++r) {
      // Indexed from a fixed base rather than advancing a pointer: one fewer 64-bit value
      // carried through the k loop.
      x_reg[r] = c_valid && (x_in_range >> r & 1u) ? x_src[k0 * x_chan_stride + r * X_STEP]
                                                   : make_float2(0.f, 0.f);
    }
  };
  auto store_tile = [&](int s, int k0) {
#pragma unroll
    for (int r = 0; r < Cfg::X_LOADS; ++r) xs[s][x_row][x_col + r * X_STEP] = Op::x(x_reg[r]);
#pragma unroll
    for (int r = 0; r < Cfg::W_LOADS; ++r) {
      const int i = tid + r * Cfg::THREADS;
      int c, o;
      w_item(i, c, o);
      if (i < BM * BK) {
        const float2 zero = make_float2(0.f, 0.f);
        WElem v = Op::w(zero, zero);
        if (m0 + o < Co && k0 + c < Ci) {
          // Two 8-byte loads: column 2 (k0 + c) is even and rows hold 2 Ci floats.
          const float2* src = reinterpret_cast<const float2*>(
              w + 2 * static_cast<int64_t>(m0 + o) * w_cols + 2 * (k0 + c));
          v = Op::w(src[0], src[Ci]);
        }
        ws[s][c][o] = v;
      }
    }
  };

  float acc[MT][NT][4] = {};
  const int o_warp = warp_m * Cfg::WM;  // within the block
  const int n_warp = warp_n * Cfg::WN;

  const int k_tiles = (Ci + BK - 1) / BK;
  if (k_tiles > 0) {
    load_x(0);
    store_tile(0, 0);
  }
  __syncthreads();
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int s = kt % 2;
    const bool has_next = kt + 1 < k_tiles;
    if (has_next) load_x((kt + 1) * BK);
#pragma unroll
    for (int kk = 0; kk < BK; kk += Op::K_CHANNELS) {
      // All B fragments, then one A fragment at a time: 4 live weight registers rather than
      // 4 MT.
      if constexpr (Op::BF16) {
        unsigned bf[NT][2];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          bf[j][0] = xs[s][kk + t][n_warp + 8 * j + g];      // B rows 2t, 2t+1: x[c]
          bf[j][1] = xs[s][kk + 4 + t][n_warp + 8 * j + g];  // B rows 2t+8, 2t+9: x[c + 4]
        }
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          const uint2 lo = ws[s][kk + t][o_warp + 8 * i + g];
          const uint2 hi = ws[s][kk + 4 + t][o_warp + 8 * i + g];
          // A (row g, cols 2t..), (row g+8, cols 2t..), (row g, cols 2t+8..), (row g+8, 2t+8..)
          const unsigned a[4] = {lo.x, lo.y, hi.x, hi.y};
#pragma unroll
          for (int j = 0; j < NT; ++j) mma_bf16_m16n8k16(acc[i][j], a, bf[j]);
        }
      } else {
        float bf[NT][2];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const float2 v = xs[s][kk + t][n_warp + 8 * j + g];
          bf[j][0] = v.x;  // B[t][g]     = Re x[c][n]
          bf[j][1] = v.y;  // B[t + 4][g] = Im x[c][n]
        }
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          const float4 v = ws[s][kk + t][o_warp + 8 * i + g];
          const float a[4] = {
              v.x,  // A[g][t]         = W[2o][2c]
              v.z,  // A[g + 8][t]     = W[2o + 1][2c]
              v.y,  // A[g][t + 4]     = W[2o][2c + 1]
              v.w,  // A[g + 8][t + 4] = W[2o + 1][2c + 1]
          };
#pragma unroll
          for (int j = 0; j < NT; ++j) mma_tf32_m16n8k8(acc[i][j], a, bf[j]);
        }
      }
    }
    if (has_next) store_tile(s ^ 1, (kt + 1) * BK);
    __syncthreads();
  }

  // d0, d1 = Re out[o][n], Re out[o][n + 1]; d2, d3 the imaginary parts; n = n0 + .. + 2t.
  const bool pairs_aligned = N % 2 == 0;  // out + o * N + n is then 16-byte aligned
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    const int o = m0 + o_warp + 8 * i + g;
    if (o >= Co) continue;
    const float bias_re = bias ? bias[2 * o] * bias_scale : 0.f;
    const float bias_im = bias ? bias[2 * o + 1] * bias_scale : 0.f;
    float2* out_row = out + o * N;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int64_t n = n0 + n_warp + 8 * j + 2 * t;
      if (n >= N) continue;
      float v[4];
      v[0] = fmaf(acc[i][j][0], weight_scale, bias_re);
      v[1] = fmaf(acc[i][j][2], weight_scale, bias_im);
      v[2] = fmaf(acc[i][j][1], weight_scale, bias_re);
      v[3] = fmaf(acc[i][j][3], weight_scale, bias_im);
      if (RELU) {  // NaN passes through, as torch.relu does
#pragma unroll
        for (int q = 0; q < 4; ++q) v[q] = v[q] < 0.f ? 0.f : v[q];
      }
      if (pairs_aligned && n + 1 < N) {
        *reinterpret_cast<float4*>(out_row + n) = make_float4(v[0], v[1], v[2], v[3]);
      } else {
        out_row[n] = make_float2(v[0], v[1]);
        if (n + 1 < N) out_row[n + 1] = make_float2(v[2], v[3]);
      }
    }
  }
}

template <class Cfg, class Op, bool RELU>
void launch_mma_tiles(const float2* x, int64_t x_batch_stride, int64_t x_chan_stride,
                      const float* w, const float* bias, float2* out, int B, int Ci, int Co,
                      int64_t N, float weight_scale, float bias_scale, cudaStream_t stream) {
  constexpr int kMaxGridY = 65535;
  const unsigned blocks = static_cast<unsigned>(((N + Cfg::BN - 1) / Cfg::BN) *
                                                ((Co + Cfg::BM - 1) / Cfg::BM));
  for (int b0 = 0; b0 < B; b0 += kMaxGridY) {
    const int batches = std::min(B - b0, kMaxGridY);
    _spectral_mix_mma_kernel<Cfg, Op, RELU><<<dim3(blocks, batches), Cfg::THREADS, 0, stream>>>(
        x + b0 * x_batch_stride, x_batch_stride, x_chan_stride, w, bias,
        out + static_cast<int64_t>(b0) * Co * N, Ci, Co, N, weight_scale, bias_scale);
  }
}

template <class Cfg, class Op>
void launch_mma_tiles(const float2* x, int64_t x_batch_stride, int64_t x_chan_stride,
                      const float* w, const float* bias, float2* out, int B, int Ci, int Co,
                      int64_t N, bool relu, float weight_scale, float bias_scale,
                      cudaStream_t stream) {
  if (relu) {
    launch_mma_tiles<Cfg, Op, true>(x, x_batch_stride, x_chan_stride, w, bias, out, B, Ci, Co, N,
                                weight_scale, bias_scale, stream);
  } else {
    launch_mma_tiles<Cfg, Op, false>(x, x_batch_stride, x_chan_stride, w, bias, out, B, Ci, Co, N,
                                 weight_scale, bias_scale, stream);
  }
}

template <class Op>
void launch_mma(const float2* x, int64_t x_batch_stride, int64_t x_chan_stride, const float* w,
                const float* bias, float2* out, int B, int Ci, int Co, int64_t N, bool relu,
                float weight_scale, float bias_scale, cudaStream_t stream) {
  if (B == 0 || Co == 0 || N == 0) return;
  launch_mma_tiles<MmaTileConfig, Op>(x, x_batch_stride, x_chan_stride, w, bias, out, B, Ci, Co, N,
                                      relu, weight_scale, bias_scale, stream);
}

}  // namespace

void spectral_mix_tf32_launch(const float2* x, int64_t x_batch_stride, int64_t x_chan_stride,
                              const float* w, const float* bias, float2* out, int B, int Ci,
                              int Co, int64_t N, bool relu, float weight_scale, float bias_scale,
                              cudaStream_t stream) {
  launch_mma<Tf32Operands>(x, x_batch_stride, x_chan_stride, w, bias, out, B, Ci, Co, N, relu,
                           weight_scale, bias_scale, stream);
}

void spectral_mix_bf16_launch(const float2* x, int64_t x_batch_stride, int64_t x_chan_stride,
                              const float* w, const float* bias, float2* out, int B, int Ci,
                              int Co, int64_t N, bool relu, float weight_scale, float bias_scale,
                              cudaStream_t stream) {
  launch_mma<Bf16Operands>(x, x_batch_stride, x_chan_stride, w, bias, out, B, Ci, Co, N, relu,
                           weight_scale, bias_scale, stream);
}
