// fourier_unit: cuFFT plans owned and cached here, around the spectral mix kernels.
//
// Plans. One R2C and one C2R plan per (device, H, W, batch layout, stream), created once with
// cuFFT's work area left to the caller (cufftSetAutoAllocation(0)), so the work area comes
// from the caller's stream-ordered allocator on every call, and bound to their stream with
// cufftSetStream. The cache is guarded by a mutex, held from cufftSetWorkArea to the exec so
// that two host threads sharing a plan cannot swap work areas under each other. At 64 plans
// the cache is emptied (cufftDestroy frees device memory, which waits for the device).
//
// Layouts. R2C reads x's planes in place: one exec of batch B * Ci at the channel stride when
// batches are evenly spaced (x_batch_stride = Ci * x_chan_stride, or B = 1), else one exec of
// batch Ci per image. Its output `spec` is packed (B, Ci, H, Wf). C2R runs in place on the
// mix's (B, Co, H, Wf) output with cuFFT's padded in-place real layout: rows of 2 Wf floats,
// W of them the result. torch.fft.irfft2 clones its input first because cuFFT's C2R
// overwrites it; here the input is the mix's own buffer, so nothing is copied.
#include "fourier_unit.h"

#include <cufft.h>

#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "spectral_mix.h"

namespace {

struct Plan {
  cufftHandle handle = 0;
  size_t work_bytes = 0;
};

// device, is C2R, H, W, batch, input distance (elements), stream
using PlanKey = std::tuple<int, bool, int64_t, int64_t, int64_t, int64_t, cudaStream_t>;

std::mutex cache_mutex;
std::map<PlanKey, Plan> plan_cache;
constexpr size_t kMaxPlans = 64;

thread_local std::string last_error;

const char* cufft_error(const char* call, cufftResult status) {
  last_error = std::string("fourier_unit: ") + call + " failed with cufftResult " +
               std::to_string(static_cast<int>(status));
  return last_error.c_str();
}

#define FU_CUFFT(call)                                         \
  do {                                                         \
    const cufftResult status_ = (call);                        \
    if (status_ != CUFFT_SUCCESS) return cufft_error(#call, status_); \
  } while (0)

// R2C: x planes (row stride W) at distance `dist` floats -> packed spectra (row stride Wf).
// C2R: packed spectra at distance H * Wf complex -> padded rows of 2 Wf floats, in place.
const char* make_plan(bool c2r, int64_t H, int64_t W, int64_t batch, int64_t dist,
                      cudaStream_t stream, Plan* plan) {
  const int64_t Wf = W / 2 + 1;
  long long n[2] = {H, W};
  long long real_embed[2] = {H, c2r ? 2 * Wf : W};
  long long complex_embed[2] = {H, Wf};
  FU_CUFFT(cufftCreate(&plan->handle));
  cufftResult status = cufftSetAutoAllocation(plan->handle, 0);
  if (status == CUFFT_SUCCESS) {
    status = c2r ? cufftMakePlanMany64(plan->handle, 2, n, complex_embed, 1, H * Wf, real_embed,
                                       1, 2 * H * Wf, CUFFT_C2R, batch, &plan->work_bytes)
                 : cufftMakePlanMany64(plan->handle, 2, n, real_embed, 1, dist, complex_embed, 1,
                                       H * Wf, CUFFT_R2C, batch, &plan->work_bytes);
  }
  if (status == CUFFT_SUCCESS) status = cufftSetStream(plan->handle, stream);
  if (status != CUFFT_SUCCESS) {
    cufftDestroy(plan->handle);
    return cufft_error(c2r ? "cufftMakePlanMany64(C2R)" : "cufftMakePlanMany64(R2C)", status);
  }
  return nullptr;
}

// The cached plan for the key, created on a miss. Caller holds cache_mutex.
const char* get_plan(bool c2r, int64_t H, int64_t W, int64_t batch, int64_t dist,
                     cudaStream_t stream, Plan* out) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    last_error = "fourier_unit: cudaGetDevice failed";
    return last_error.c_str();
  }
  const PlanKey key{device, c2r, H, W, batch, dist, stream};
  auto it = plan_cache.find(key);
  if (it == plan_cache.end()) {
    Plan plan;
    if (const char* err = make_plan(c2r, H, W, batch, dist, stream, &plan)) return err;
    it = plan_cache.emplace(key, plan).first;
  }
  *out = it->second;
  return nullptr;
}

// How R2C covers x: `execs` calls of batch `batch` at input distance `dist`, call i starting
// i * x_batch_stride floats into x.
struct R2CLayout {
  int64_t batch, dist, execs;
};

R2CLayout r2c_layout(const FourierUnitShape& s) {
  R2CLayout layout{s.Ci, s.x_chan_stride, s.B};
  if (s.Ci == 1) {
    layout = {s.B, s.x_batch_stride, 1};
  } else if (s.B == 1 || s.x_batch_stride == s.Ci * s.x_chan_stride) {
    layout = {s.B * s.Ci, s.x_chan_stride, 1};
  }
  // A single transform has no distance; a size-1 dim's stride can be anything (even 0), so
  // the plan (and its cache key) takes the packed one.
  if (layout.batch == 1) layout.dist = s.H * s.W;
  return layout;
}

const char* plans_for(const FourierUnitShape& s, cudaStream_t stream, Plan* r2c, Plan* c2r) {
  // Emptied before, never between, the two look-ups: both plans stay valid for this call.
  if (plan_cache.size() + 2 > kMaxPlans) {
    for (auto& entry : plan_cache) cufftDestroy(entry.second.handle);
    plan_cache.clear();
  }
  const R2CLayout layout = r2c_layout(s);
  if (const char* err = get_plan(false, s.H, s.W, layout.batch, layout.dist, stream, r2c)) {
    return err;
  }
  return get_plan(true, s.H, s.W, s.B * s.Co, s.H * s.Wf(), stream, c2r);
}

}  // namespace

const char* fourier_unit_prepare(const FourierUnitShape& shape, cudaStream_t stream,
                                 size_t* work_bytes) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  Plan r2c, c2r;
  if (const char* err = plans_for(shape, stream, &r2c, &c2r)) return err;
  *work_bytes = r2c.work_bytes > c2r.work_bytes ? r2c.work_bytes : c2r.work_bytes;
  return nullptr;
}

const char* fourier_unit_launch(const FourierUnitShape& s, const float* x, const float* w,
                                const float* bias, bool relu, float weight_scale,
                                float bias_scale, MixPrecision precision, float2* spec,
                                float2* out, void* work, cudaStream_t stream) {
  const int64_t N = s.H * s.Wf();
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    Plan r2c, c2r;
    if (const char* err = plans_for(s, stream, &r2c, &c2r)) return err;
    const R2CLayout layout = r2c_layout(s);
    FU_CUFFT(cufftSetWorkArea(r2c.handle, work));
    for (int64_t i = 0; i < layout.execs; ++i) {
      // cuFFT's exec takes non-const pointers; an out-of-place R2C does not write its input.
      FU_CUFFT(cufftExecR2C(r2c.handle, const_cast<float*>(x) + i * s.x_batch_stride,
                            reinterpret_cast<cufftComplex*>(spec + i * layout.batch * N)));
    }
    const int B = static_cast<int>(s.B), Ci = static_cast<int>(s.Ci), Co = static_cast<int>(s.Co);
    if (precision == MixPrecision::kTf32) {
      spectral_mix_tf32_launch(spec, Ci * N, N, w, bias, out, B, Ci, Co, N, relu, weight_scale,
                               bias_scale, stream);
    } else if (precision == MixPrecision::kBf16) {
      spectral_mix_bf16_launch(spec, Ci * N, N, w, bias, out, B, Ci, Co, N, relu, weight_scale,
                               bias_scale, stream);
    } else {
      spectral_mix_launch(spec, Ci * N, N, w, bias, out, B, Ci, Co, N, relu, stream,
                          weight_scale, bias_scale);
    }
    const cudaError_t launched = cudaGetLastError();
    if (launched != cudaSuccess) {
      last_error = std::string("fourier_unit: spectral mix launch failed: ") +
                   cudaGetErrorString(launched);
      return last_error.c_str();
    }
    FU_CUFFT(cufftSetWorkArea(c2r.handle, work));
    FU_CUFFT(cufftExecC2R(c2r.handle, reinterpret_cast<cufftComplex*>(out),
                          reinterpret_cast<cufftReal*>(out)));
  }
  return nullptr;
}

size_t fourier_unit_cached_plans() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  return plan_cache.size();
}
