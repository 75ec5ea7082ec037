// spectral_mix: LaMa FourierUnit's 1x1 convolution over the stacked real and imaginary parts of
// rfft2(x), with BatchNorm folded into weight and bias and an optional ReLU, reading the complex
// spectrum in place and writing the complex result ready for irfft2.
//
// Fused: view_as_real + permute/contiguous (LaMa's stack of re/im as channels 2c, 2c + 1), the 1x1
// conv, BatchNorm (eval, folded by the caller), ReLU, the permute/contiguous back and
// torch.complex. For Ci = Co = C channels of N spectral points, eager moves about 120 * C * N bytes
// in seven kernels; this one reads the input once and writes the output once, 16 * C * N bytes.
// The weights (16 * C^2 bytes) are re-read by every block and stay in L2.
//
// Layout: the input spectrum is complex64 read as interleaved float2; batch and channel strides
// are arbitrary, the N = H * Wf spatial positions contiguous. Output (B, Co, N) contiguous.
// Limits: fp32 only, fp32 accumulation (no TF32); ceil(Co / 16) <= 65535; any B (launched in
// chunks of 65535 batches).
//
// It is a batched fp32 GEMM, out_b (2Co x N) = W (2Co x 2Ci) @ X_b (2Ci x N), in which the rows
// 2c, 2c + 1 of X_b are one float2 and the rows 2o, 2o + 1 of out_b one float2. A block owns BM
// complex output channels x BN spatial positions; each k-stage stages BK complex input channels
// of X (float2, coalesced along n) and the matching 2BM x 2BK block of W in shared memory, the
// latter regrouped as one float4 per (input channel, output channel) pair so a thread reads all
// four real weights that couple them in one load. Each thread keeps TM x TN complex outputs
// (2 * TM * TN fp32 accumulators); its TN positions are strided by the thread-row width so that
// shared-memory reads and global stores of a warp are contiguous. Two shared-memory stages: the
// next tile's global loads are issued into registers before computing on the current one.
#include "spectral_mix.h"

#include <algorithm>

namespace {

template <int BM_, int BN_, int BK_, int TM_, int TN_, int MIN_BLOCKS_>
struct TileConfig {
  static constexpr int BM = BM_;  // complex output channels per block
  static constexpr int BN = BN_;  // spatial positions per block
  static constexpr int BK = BK_;  // complex input channels per shared-memory stage
  static constexpr int TM = TM_;  // complex output channels per thread
  static constexpr int TN = TN_;  // spatial positions per thread
  static constexpr int MIN_BLOCKS = MIN_BLOCKS_;  // resident per SM: <= 64K / (THREADS * this) regs
  static constexpr int THREADS_N = BN / TN;
  static constexpr int THREADS = THREADS_N * (BM / TM);
  static constexpr int X_LOADS = BK * BN / THREADS;      // float2 per thread per stage
  static constexpr int W_LOADS = 4 * BM * BK / THREADS;  // floats per thread per stage
  static_assert(BM % TM == 0 && BN % TN == 0, "thread tiles must divide the block tile");
  // Staging: a thread copies X_LOADS positions of one X row, X_THREADS_PER_ROW apart (a warp
  // reads contiguous float2), and W_LOADS adjacent columns of one W row, so one base pointer
  // and compile-time offsets address them all.
  static constexpr int X_THREADS_PER_ROW = BN / X_LOADS;
  static constexpr int W_THREADS_PER_ROW = 2 * BK / W_LOADS;
  static_assert(THREADS * X_LOADS == BK * BN && BN % X_LOADS == 0, "X tile must split evenly");
  static_assert(THREADS * W_LOADS == 4 * BM * BK && 2 * BK % W_LOADS == 0 && W_LOADS % 2 == 0,
                "W tile must split evenly, in whole complex input channels");
};

// 64 accumulators per thread within 128 registers: two 256-thread blocks per SM.
using LargeTile = TileConfig<64, 128, 8, 4, 8, 2>;
// For few output channels, or too few large tiles to fill the GPU.
using SmallTile = TileConfig<16, 128, 8, 2, 4, 4>;

template <class Cfg, bool RELU>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MIN_BLOCKS)
    _spectral_mix_kernel(const float2* __restrict__ x, int64_t x_batch_stride,
                         int64_t x_chan_stride, const float* __restrict__ w,
                         const float* __restrict__ bias, float2* __restrict__ out, int Ci, int Co,
                         int64_t N, float weight_scale, float bias_scale) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, TM = Cfg::TM, TN = Cfg::TN;
  constexpr int THREADS_N = Cfg::THREADS_N;

  __shared__ float2 xs[2][BK][BN];
  // ws[s][k][o] = (w[2o][2k], w[2o][2k+1], w[2o+1][2k], w[2o+1][2k+1]). One float4 of padding per
  // k row shifts the k rows against each other in the banks, which makes the staging stores
  // (each thread writes along k) conflict-free for both tile shapes.
  __shared__ float4 ws[2][BK][BM + 1];

  const int tid = threadIdx.x;
  const int tx = tid % THREADS_N;
  const int ty = tid / THREADS_N;
  // Output-channel tiles fastest: the blocks that read one spatial tile of the spectrum run side by
  // side, so it comes from HBM once and from L2 for the other output channels.
  const int m_tiles = (Co + BM - 1) / BM;
  const int m0 = static_cast<int>(blockIdx.x % m_tiles) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x / m_tiles) * BN;
  const int64_t b = blockIdx.y;
  x += b * x_batch_stride;
  out += b * Co * N;
  const int64_t w_cols = 2 * static_cast<int64_t>(Ci);

  // Staging coordinates, fixed for the whole k loop: X row x_row (input channel k0 + x_row),
  // positions x_n + r * X_THREADS_PER_ROW; W row w_row, columns 2 * k0 + w_col + r.
  constexpr int X_STEP = Cfg::X_THREADS_PER_ROW;
  const int x_row = tid / X_STEP;
  const int x_col = tid % X_STEP;
  const int64_t x_n = n0 + x_col;
  const int w_row = tid / Cfg::W_THREADS_PER_ROW;
  const int w_col = tid % Cfg::W_THREADS_PER_ROW * Cfg::W_LOADS;
  const bool w_row_valid = 2 * m0 + w_row < 2 * Co;
  const float2* x_src = x + x_row * x_chan_stride + x_n;
  const float* w_src = w + (2 * m0 + w_row) * w_cols + w_col;

  float2 x_reg[Cfg::X_LOADS];
  float w_reg[Cfg::W_LOADS];

  // Out-of-range channels and positions load zeros in both operands, so they add exact zeros.
  auto load_tile = [&](int k0) {
    const bool c_valid = k0 + x_row < Ci;
#pragma unroll
    for (int r = 0; r < Cfg::X_LOADS; ++r) {
      x_reg[r] = c_valid && x_n + r * X_STEP < N ? x_src[r * X_STEP] : make_float2(0.f, 0.f);
    }
#pragma unroll
    for (int r = 0; r < Cfg::W_LOADS; ++r) {
      w_reg[r] = w_row_valid && 2 * k0 + w_col + r < 2 * Ci ? w_src[r] : 0.f;
    }
    x_src += BK * x_chan_stride;
    w_src += 2 * BK;
  };
  auto store_tile = [&](int s) {
#pragma unroll
    for (int r = 0; r < Cfg::X_LOADS; ++r) xs[s][x_row][x_col + r * X_STEP] = x_reg[r];
#pragma unroll
    for (int r = 0; r < Cfg::W_LOADS; r += 2) {
      float* dst = reinterpret_cast<float*>(&ws[s][(w_col + r) / 2][w_row / 2]) + (w_row % 2) * 2;
      dst[0] = w_reg[r];
      dst[1] = w_reg[r + 1];
    }
  };

  float acc_re[TM][TN] = {}, acc_im[TM][TN] = {};

  const int k_tiles = (Ci + BK - 1) / BK;
  if (k_tiles > 0) {
    load_tile(0);
    store_tile(0);
  }
  __syncthreads();
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int s = kt % 2;
    const bool has_next = kt + 1 < k_tiles;
    if (has_next) load_tile((kt + 1) * BK);
    // Not unrolled: unrolling lets ptxas prefetch operands of later k steps, which pushes the
    // large tile past its 128-register budget into spills; the other resident warps hide the
    // shared-memory latency instead.
#pragma unroll 1
    for (int k = 0; k < BK; ++k) {
      float4 wv[TM];
      float2 xv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) wv[i] = ws[s][k][ty * TM + i];
#pragma unroll
      for (int j = 0; j < TN; ++j) xv[j] = xs[s][k][tx + j * THREADS_N];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          acc_re[i][j] = fmaf(wv[i].y, xv[j].y, fmaf(wv[i].x, xv[j].x, acc_re[i][j]));
          acc_im[i][j] = fmaf(wv[i].w, xv[j].y, fmaf(wv[i].z, xv[j].x, acc_im[i][j]));
        }
      }
    }
    // The other stage was last read before the previous barrier, so it is free to overwrite.
    if (has_next) store_tile(s ^ 1);
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int o = m0 + ty * TM + i;
    if (o >= Co) continue;
    const float bias_re = bias ? bias[2 * o] * bias_scale : 0.f;
    const float bias_im = bias ? bias[2 * o + 1] * bias_scale : 0.f;
    float2* out_row = out + o * N;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t n = n0 + tx + j * THREADS_N;
      if (n >= N) continue;
      // With both scales 1 (spectral_mix's binding) this is exactly acc + bias.
      float re = fmaf(acc_re[i][j], weight_scale, bias_re);
      float im = fmaf(acc_im[i][j], weight_scale, bias_im);
      if (RELU) {  // written so that NaN passes through, as torch.relu does
        re = re < 0.f ? 0.f : re;
        im = im < 0.f ? 0.f : im;
      }
      out_row[n] = make_float2(re, im);
    }
  }
}

template <class Cfg, bool RELU>
void launch_tiles(const float2* x, int64_t x_batch_stride, int64_t x_chan_stride, const float* w,
                  const float* bias, float2* out, int B, int Ci, int Co, int64_t N,
                  float weight_scale, float bias_scale, cudaStream_t stream) {
  constexpr int kMaxGridY = 65535;
  const unsigned n_tiles = static_cast<unsigned>((N + Cfg::BN - 1) / Cfg::BN);
  const unsigned m_tiles = static_cast<unsigned>((Co + Cfg::BM - 1) / Cfg::BM);
  for (int b0 = 0; b0 < B; b0 += kMaxGridY) {
    const int batches = std::min(B - b0, kMaxGridY);
    _spectral_mix_kernel<Cfg, RELU><<<dim3(n_tiles * m_tiles, batches), Cfg::THREADS, 0, stream>>>(
        x + b0 * x_batch_stride, x_batch_stride, x_chan_stride, w, bias,
        out + static_cast<int64_t>(b0) * Co * N, Ci, Co, N, weight_scale, bias_scale);
  }
}

template <class Cfg>
void launch_tiles(const float2* x, int64_t x_batch_stride, int64_t x_chan_stride, const float* w,
                  const float* bias, float2* out, int B, int Ci, int Co, int64_t N, bool relu,
                  float weight_scale, float bias_scale, cudaStream_t stream) {
  if (relu) {
    launch_tiles<Cfg, true>(x, x_batch_stride, x_chan_stride, w, bias, out, B, Ci, Co, N,
                            weight_scale, bias_scale, stream);
  } else {
    launch_tiles<Cfg, false>(x, x_batch_stride, x_chan_stride, w, bias, out, B, Ci, Co, N,
                             weight_scale, bias_scale, stream);
  }
}

}  // namespace

void spectral_mix_launch(const float2* x, int64_t x_batch_stride, int64_t x_chan_stride,
                         const float* w, const float* bias, float2* out, int B, int Ci, int Co,
                         int64_t N, bool relu, cudaStream_t stream, float weight_scale,
                         float bias_scale) {
  if (B == 0 || Co == 0 || N == 0) return;
  // Large tiles only when they make at least one full wave (two blocks per SM); otherwise the
  // 4x more numerous small tiles keep more SMs busy.
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t large_blocks = ((N + LargeTile::BN - 1) / LargeTile::BN) *
                               ((Co + LargeTile::BM - 1) / LargeTile::BM) * B;
  if (Co > SmallTile::BM && large_blocks >= 2 * static_cast<int64_t>(sms)) {
    launch_tiles<LargeTile>(x, x_batch_stride, x_chan_stride, w, bias, out, B, Ci, Co, N, relu,
                            weight_scale, bias_scale, stream);
  } else {
    launch_tiles<SmallTile>(x, x_batch_stride, x_chan_stride, w, bias, out, B, Ci, Co, N, relu,
                            weight_scale, bias_scale, stream);
  }
}
