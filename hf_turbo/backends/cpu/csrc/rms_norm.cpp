#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <string>

// transformers' LlamaRMSNorm.forward in float32, in one call and bitwise:
//   variance = x.pow(2).mean(-1, keepdim=True); out = weight * (x * rsqrt(variance + eps))
// Everything but the sum is a chain of correctly rounded IEEE operations (pow(2) is x*x, mean is
// sum(...).div_(H) with a true division, rsqrt is 1/sqrt), so the bits depend only on the order of
// the sum and on no FMA contraction (hence the pragma). The sum is ATen's cascade_sum over a contiguous
// last dim (aten/src/ATen/native/cpu/SumKernel.cpp): SumKernel registers with REGISTER_DISPATCH, which
// gives AVX512 builds no kernel, so even on AVX-512 machines the sum runs ATen's AVX2 build with
// 8-lane vectors: row_sum with 4 accumulators (ILP) over groups of four 8-float vectors, a 4-level
// cascade, leftover vectors into accumulator 0, accumulators 1-3 added into 0, then the scalar tail and
// the 8 lanes added one by one; rows under 8 floats take the scalar row_sum. Here the 8-lane
// accumulators sit side by side in this build's wider registers, lane by lane, which rounds the same.
// With more than one thread ATen splits a single row of >= GRAIN_SIZE floats between threads;
// rms_norm_fast_path_exact says false there (and for a strided last dim), and rms_norm then runs
// ATen's ops.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

namespace at::native {
namespace {

using Vec = vec::Vectorized<float>;

constexpr int64_t kVecN = Vec::size();

// ATen's utils::CeilLog2 (aten/src/ATen/native/cpu/utils.h)
inline int64_t ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  return 64 - __builtin_clzll(static_cast<uint64_t>(x) - 1);
}

// The sum kernel runs with AVX2 vectors (8 floats), see above: multi_row_sum<Vectorized<float>, 4> keeps
// acc[level][k], k = 0..3, of 8 lanes each, and its "row" i covers x2[32i, 32i + 32), acc[.][k] taking
// x2[32i + 8k, 32i + 8k + 8). Here each level's 32 lanes sit in 32 / Vec::size() registers (two 16-lane
// ones on AVX-512); every operation is a lane-wise float add, so the roundings and their order are
// ATen's. Stores the 4 accumulators, 8 lanes each, to P[32] (P[8k + lane]).
constexpr int64_t kSumRegs = 32 / kVecN;
static_assert(32 % kVecN == 0, "the sum emulation needs a vector width that divides 32");
inline void cascade_sum_sq_avx2_layout(const float* x, int64_t size, float* P) {
  constexpr int64_t num_levels = 4;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / num_levels);
  const int64_t level_step = int64_t(1) << level_power;
  const int64_t level_mask = level_step - 1;

  Vec acc[num_levels][kSumRegs];
  for (int64_t l = 0; l < num_levels; ++l) {
    for (int64_t r = 0; r < kSumRegs; ++r) acc[l][r] = Vec(0.f);
  }
  auto add_row = [x, &acc](int64_t i) {
    for (int64_t r = 0; r < kSumRegs; ++r) {
      const Vec a = Vec::loadu(x + i * 32 + r * kVecN);
      acc[0][r] = acc[0][r] + a * a;  // pow(2) (x*x, rounded) then the sum's add: no FMA (pragma)
    }
  };

  int64_t i = 0;
  for (; i + level_step <= size;) {
    for (int64_t j = 0; j < level_step; ++j, ++i) add_row(i);
    for (int64_t j = 1; j < num_levels; ++j) {
      for (int64_t r = 0; r < kSumRegs; ++r) {
        acc[j][r] = acc[j][r] + acc[j - 1][r];
        acc[j - 1][r] = Vec(0.f);
      }
      const auto mask = (level_mask << (j * level_power));
      if ((i & mask) != 0) break;
    }
  }
  for (; i < size; ++i) add_row(i);
  for (int64_t j = 1; j < num_levels; ++j) {
    for (int64_t r = 0; r < kSumRegs; ++r) acc[0][r] = acc[0][r] + acc[j][r];
  }
  for (int64_t r = 0; r < kSumRegs; ++r) acc[0][r].store(P + r * kVecN);
}

// row_sum<float, LoadPolicy<float>> (scalar_inner_sum / scalar_outer_sum), for H < 8.
inline float scalar_row_sum_sq(const float* x, int64_t n) {
  constexpr int64_t ilp = 4;
  constexpr int64_t num_levels = 4;
  const int64_t size = n / ilp;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / num_levels);
  const int64_t level_step = int64_t(1) << level_power;
  const int64_t level_mask = level_step - 1;
  float acc[num_levels][ilp];
  for (auto& l : acc)
    for (auto& a : l) a = 0.f;
  auto sq = [x](int64_t e) {
    const float v = x[e];
    return v * v;
  };
  int64_t i = 0;
  for (; i + level_step <= size;) {
    for (int64_t j = 0; j < level_step; ++j, ++i) {
      for (int64_t k = 0; k < ilp; ++k) acc[0][k] += sq(i * ilp + k);
    }
    for (int64_t j = 1; j < num_levels; ++j) {
      for (int64_t k = 0; k < ilp; ++k) {
        acc[j][k] += acc[j - 1][k];
        acc[j - 1][k] = 0.f;
      }
      const auto mask = (level_mask << (j * level_power));
      if ((i & mask) != 0) break;
    }
  }
  for (; i < size; ++i) {
    for (int64_t k = 0; k < ilp; ++k) acc[0][k] += sq(i * ilp + k);
  }
  for (int64_t j = 1; j < num_levels; ++j) {
    for (int64_t k = 0; k < ilp; ++k) acc[0][k] += acc[j][k];
  }
  for (int64_t e = size * ilp; e < n; ++e) acc[0][0] += sq(e);
  for (int64_t k = 1; k < ilp; ++k) acc[0][0] += acc[0][k];
  return acc[0][0];
}

// cascade_sum's per-row result for a contiguous last dim (AVX2 kernel, 8-lane vectors).
inline float sum_sq_like_aten(const float* x, int64_t H) {
  constexpr int64_t W = 8;  // Vectorized<float>::size() in the AVX2 SumKernel
  float final_acc;
  if (H >= W) {
    // vectorized_inner_sum -> row_sum<Vectorized<float>>(row, 32 bytes, vec_size)
    const int64_t vec_size = H / W;
    const int64_t size_ilp = vec_size / 4;
    alignas(64) float P[32];
    cascade_sum_sq_avx2_layout(x, size_ilp, P);
    // row_sum: leftover (vec_size % 4) 8-wide vectors go into partial_sums[0]
    for (int64_t v = size_ilp * 4; v < vec_size; ++v) {
      for (int64_t l = 0; l < W; ++l) {
        const float e = x[v * W + l];
        const float e2 = e * e;
        P[l] += e2;
      }
    }
    // partial_sums[0] += partial_sums[k], k = 1..3
    for (int64_t k = 1; k < 4; ++k)
      for (int64_t l = 0; l < W; ++l) P[l] += P[k * W + l];
    // vectorized_inner_sum: scalar tail first, then the 8 lanes in order
    final_acc = 0.f;
    for (int64_t k = vec_size * W; k < H; ++k) {
      const float e = x[k];
      const float e2 = e * e;
      final_acc += e2;
    }
    for (int64_t l = 0; l < W; ++l) final_acc += P[l];
  } else {
    // scalar_inner_sum / scalar_outer_sum -> row_sum<float>
    final_acc = scalar_row_sum_sq(x, H);
  }
  float out = 0.f;  // iter.output().fill_(0) + CastStoreAccumulate (*out += value)
  out += final_acc;
  return out;
}

void rms_norm_rows(const float* x, const float* w, float* y, int64_t rows, int64_t H,
                   float eps) {
  const float Hf = static_cast<float>(H);  // wrapped int64 scalar -> float (common dtype)
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / H);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * H;
      float* yr = y + r * H;
      const float s = sum_sq_like_aten(xr, H);
      const float var = s / Hf;             // div_true_kernel: a / b
      const float ve = var + eps;           // add: a + 1*b
      const float inv = 1.f / std::sqrt(ve);  // rsqrt_kernel
      const Vec vinv(inv);
      int64_t k = 0;
      for (; k + kVecN <= H; k += kVecN) {
        const Vec xv = Vec::loadu(xr + k);
        const Vec wv = Vec::loadu(w + k);
        (wv * (xv * vinv)).store(yr + k);
      }
      if (k < H) {
        const int64_t n = H - k;
        const Vec xv = Vec::loadu(xr + k, n);
        const Vec wv = Vec::loadu(w + k, n);
        (wv * (xv * vinv)).store(yr + k, n);
      }
    }
  });
}

}  // namespace
}  // namespace at::native

#pragma GCC pop_options

// True when the fused kernel is guaranteed to give the same bits as the ATen op chain
// under the current threading settings. When false, rms_norm() itself falls back to the
// ATen ops (so its result is still bit-exact, just not faster).
bool rms_norm_fast_path_exact(const at::Tensor& x) {
  // The sum order depends on the Vectorized<float> width of the SumKernel that ATen
  // dispatches to. With capability AVX512 it is the AVX2 kernel (REGISTER_DISPATCH ->
  // nullptr for AVX512); with AVX2 it is the same kernel; with DEFAULT the generic
  // Vectorized<float> is also 8 lanes (32-byte vec_base). All three verified to match
  // (ATEN_CPU_CAPABILITY=default/avx2/avx512). Anything else: don't assume.
  static const bool known_capability = [] {
    const std::string c = at::get_cpu_capability();
    return c == "AVX512" || c == "AVX2" || c == "DEFAULT";
  }();
  if (!known_capability) return false;
  if (x.dim() == 0) return false;
  const int64_t H = x.size(-1);
  if (H == 0 || x.numel() == 0) return false;
  // A non-contiguous last dim makes ATen's pow output keep that layout and the sum take
  // a different loop (vectorized_outer_sum / scalar paths): different order.
  if (H > 1 && x.stride(-1) != 1) return false;
  const int64_t rows = x.numel() / H;
  // TensorIteratorBase::parallel_reduce: two_pass_reduction splits a single row among
  // threads when the output has 1 element and numel >= GRAIN_SIZE.
  if (rows == 1 && H >= at::internal::GRAIN_SIZE && at::get_num_threads() > 1 &&
      !at::in_parallel_region()) {
    return false;
  }
  return true;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && x.scalar_type() == at::kFloat &&
                  weight.scalar_type() == at::kFloat,
              "rms_norm: float32 CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm: weight must be [H] for x [..., H]");
  if (!rms_norm_fast_path_exact(x)) {  // the module's own ops
    return weight * (x * at::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + eps));
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t h = x.size(-1);
  at::native::rms_norm_rows(xc.data_ptr<float>(), wc.data_ptr<float>(), y.data_ptr<float>(), x.numel() / h, h,
                            static_cast<float>(eps));
  return y;
}
