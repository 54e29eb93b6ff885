// Batched CPU decode attention over contiguous per-sequence K/V rows (hf_turbo/cache/contiguous.py).
//
// One call attends every single-query sequence of an engine step, instead of one
// scaled_dot_product_attention call per sequence. Each (sequence, KV head) pair runs the same float
// operations, in the same order, as PyTorch's CPU flash-attention kernel does for a call with
// q [1, H_kv, g, D] (the g query heads of one KV head as rows), k/v [1, H_kv, L, D], no mask, not
// causal: a q.k^T gemm per block of up to 512 keys, the fused scale+max and exp+sum vector loops,
// the online-softmax rescale, a p@v gemm, and one multiply by the reciprocal of the sum. It is built
// for the CPU capability PyTorch dispatches to (hf_turbo/kernels/cpu_ext.py), and that module checks it
// against scaled_dot_product_attention bit for bit before the engine uses it.
//
// The same extension carries helpers of the engine's CPU step: scatter_kv (the K/V writes of a step as
// one byte copy), rope (transformers' rotary embedding in one call, bitwise), rms_norm (its RMSNorm
// in one call, bitwise), silu_mul (the MLP's act(gate) * up, bitwise) and pack_weight / packed_linear
// (F.linear on a weight packed once for MKL).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <cmath>
#include <array>
#include <cstring>
#include <vector>
#include <limits>

// MKL's Fortran sgemm, exported by libtorch_cpu: the routine at::native::cpublas::gemm calls for float
// (that wrapper itself is not exported).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

// MKL's packed-GEMM API (cblas_sgemm_pack / cblas_sgemm_compute), also exported by libtorch_cpu. Weak, so
// that the extension still loads against a BLAS without them; packed_gemm_available() then says false.
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace at::native {
namespace {

using Vec = vec::Vectorized<float>;

// cpublas::gemm for float, as PyTorch calls BLAS: column-major, leading dimensions normalised for
// size-1 dimensions first (cpublas::internal::normalize_last_dims).
inline void gemm(bool trans_a, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (n == 1) ldc = m;
  if (trans_a) {
    if (m == 1) lda = k;
  } else if (k == 1) {
    lda = m;
  }
  if (n == 1) ldb = k;  // b is never transposed here
  const char ta = trans_a ? 't' : 'n', tb = 'n';
  const int m_ = m, n_ = n, k_ = k, lda_ = lda, ldb_ = ldb, ldc_ = ldc;
  sgemm_(&ta, &tb, &m_, &n_, &k_, &alpha, a, &lda_, b, &ldb_, &beta, c, &ldc_);
}

// a <- a * scale; returns max(a)
inline float scale_max(float* a, float scale, int64_t size) {
  const int64_t vs = Vec::size();
  const auto vec_scale = Vec(scale);
  float tmp_max = -std::numeric_limits<float>::infinity();
  auto vec_tmp_max = Vec(tmp_max);
  for (int64_t i = 0; i < vs * (size / vs); i += vs) {
    auto tmp1 = Vec::loadu(a + i) * vec_scale;
    vec_tmp_max = vec::maximum(vec_tmp_max, tmp1);
    tmp1.store(a + i);
  }
  for (int64_t i = vs * (size / vs); i < size; i++) {
    auto tmp1 = a[i] * scale;
    tmp_max = std::max(tmp_max, tmp1);
    a[i] = tmp1;
  }
  return std::max(tmp_max, vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return vec::maximum(x, y); },
                                                      vec_tmp_max));
}

// a <- exp(a - max); returns sum(a)
inline float exp_sum(float* a, float max, int64_t size) {
  const int64_t vs = Vec::size();
  const auto vec_max = Vec(max);
  float tmp_sum = 0;
  auto vec_tmp_sum = Vec(tmp_sum);
  for (int64_t i = 0; i < vs * (size / vs); i += vs) {
    auto tmp2 = (Vec::loadu(a + i) - vec_max).exp_u20();
    vec_tmp_sum += tmp2;
    tmp2.store(a + i);
  }
  tmp_sum = vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, vec_tmp_sum);
  for (int64_t i = vs * (size / vs); i < size; i++) {
    auto tmp1 = a[i] - max;
    // ATen's kernel writes exp(tmp1) and gets the C library's double exp there (checked bitwise: the
    // float overload differs in the last bit now and then)
    float tmp2 = static_cast<float>(::exp(static_cast<double>(tmp1)));
    tmp_sum += tmp2;
    a[i] = tmp2;
  }
  return tmp_sum;
}

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// query rows per block, as ATen's dispatcher picks its q_split_size from the call's query length
inline int64_t q_split_for(int64_t rows) {
  return std::min<int64_t>(rows >= 768 ? 256 : (rows >= 192 ? 64 : 32), rows);
}

// One (sequence, KV head h of num_heads): q [rows, D] (row stride q_stride), k/v [L, D] (row stride
// kv_stride), out [rows, D] (row stride q_stride). buf: 64-byte aligned, with 16 floats of room beyond
// q_split * min(512, L) + 2 * q_split + q_split * D.
//
// MKL's sgemm can round differently for differently aligned operands, so the scratch rows sit where
// the SDPA call would have put them: in its per-thread buffer (64-byte aligned, one
// size_per_thread block per thread) of the thread that at::parallel_for would give this
// (head, query block) item in a call with torch_threads threads.
void attend_one(const float* q, int64_t q_stride, const float* k, const float* v, int64_t kv_stride,
                int64_t rows, int64_t kv_len, int64_t head_dim, float scale, float* out, float* buf, int64_t h,
                int64_t num_heads, int64_t torch_threads) {
  const int64_t q_split = q_split_for(rows);
  const int64_t kv_split = std::min<int64_t>(512, kv_len);
  const int64_t q_slice = divup(rows, q_split);
  const int64_t size_per_thread = q_split * kv_split + 2 * q_split + q_split * head_dim;
  const int64_t items = num_heads * q_slice;
  const int64_t team = items > 1 ? std::min(torch_threads, items) : 1;
  const int64_t chunk = divup(items, team);
  for (int64_t m = 0; m < rows; m += q_split) {
    const int64_t q_block = std::min(q_split, rows - m);
    const int64_t tid = (h * q_slice + m / q_split) / chunk;
    float* qk = buf + (tid * size_per_thread) % 16;  // the same offset from a 64-byte boundary
    float* qk_max = qk + q_split * kv_split;
    float* qk_sum = qk_max + q_split;
    float* dst = qk_sum + q_split;
    for (const auto r : c10::irange(q_block)) {
      qk_max[r] = -std::numeric_limits<float>::infinity();
      qk_sum[r] = 0;
    }
    for (int64_t n = 0; n < kv_len; n += kv_split) {
      const int64_t kv_block = std::min(kv_split, kv_len - n);
      gemm(true, kv_block, q_block, head_dim, 1.0f, k + n * kv_stride, kv_stride, q + m * q_stride, q_stride,
           0.0f, qk, kv_block);
      for (int64_t r = 0; r < q_block; ++r) {
        float tmp_max = scale_max(qk + r * kv_block, scale, kv_block);
        tmp_max = qk_max[r] > tmp_max ? qk_max[r] : tmp_max;
        if (tmp_max == -std::numeric_limits<float>::infinity()) {
          std::fill(qk + r * kv_block, qk + (r + 1) * kv_block, 0.0f);
          continue;
        }
        float tmp_sum = exp_sum(qk + r * kv_block, tmp_max, kv_block);
        float exp_tmp = std::exp(qk_max[r] - tmp_max);
        qk_sum[r] = tmp_sum + exp_tmp * qk_sum[r];
        qk_max[r] = tmp_max;
        if (n > 0) {
          vec::map<float>([exp_tmp](Vec x) { return x * Vec(exp_tmp); }, dst + r * head_dim, dst + r * head_dim,
                          head_dim);
        }
      }
      gemm(false, head_dim, q_block, kv_block, 1.0f, v + n * kv_stride, kv_stride, qk, kv_block,
           n == 0 ? 0.0f : 1.0f, dst, head_dim);
    }
    for (int64_t r = 0; r < q_block; ++r) {
      qk_sum[r] = qk_sum[r] == 0 ? 1 : qk_sum[r];
      float sum_reciprocal = 1 / qk_sum[r];
      vec::map<float>([sum_reciprocal](Vec x) { return x * Vec(sum_reciprocal); }, out + (m + r) * q_stride,
                      dst + r * head_dim, head_dim);
    }
  }
}

}  // namespace
}  // namespace at::native

// q, out: [T, H_kv, g, D] contiguous float32. k_arena, v_arena: [S, H_kv, C, D] float32, last dim
// contiguous. rows, slots, lens: int64 [n]: sequence i's query is q[rows[i]], its keys are
// k_arena[slots[i], :, :lens[i]]. Writes out[rows[i]] for every i; other rows of out are untouched.
void decode_attention(const at::Tensor& q, const at::Tensor& k_arena, const at::Tensor& v_arena,
                      const at::Tensor& rows, const at::Tensor& slots, const at::Tensor& lens, double scale,
                      at::Tensor& out) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_arena.scalar_type() == at::kFloat &&
                  v_arena.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "decode_attention: float32 only");
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && out.is_contiguous() && out.sizes() == q.sizes(),
              "decode_attention: q and out must be contiguous [T, H_kv, g, D]");
  TORCH_CHECK(k_arena.dim() == 4 && v_arena.dim() == 4 && k_arena.stride(3) == 1 && v_arena.stride(3) == 1,
              "decode_attention: arenas must be [S, H_kv, C, D] with a contiguous last dim");
  TORCH_CHECK(k_arena.sizes() == v_arena.sizes() && k_arena.stride(2) == v_arena.stride(2) &&
                  k_arena.size(1) == q.size(1) && k_arena.size(3) == q.size(3),
              "decode_attention: k and v arenas must share the layout and match q");
  const int64_t n = rows.numel();
  const int64_t h_kv = q.size(1), g = q.size(2), d = q.size(3);
  const int64_t kv_stride = k_arena.stride(2);
  const int64_t* row_p = rows.data_ptr<int64_t>();
  const int64_t* slot_p = slots.data_ptr<int64_t>();
  const int64_t* len_p = lens.data_ptr<int64_t>();
  for (const auto i : c10::irange(n)) {
    TORCH_CHECK(row_p[i] >= 0 && row_p[i] < q.size(0) && slot_p[i] >= 0 && slot_p[i] < k_arena.size(0) &&
                    len_p[i] >= 1 && len_p[i] <= k_arena.size(2),
                "decode_attention: row, slot or length out of range");
  }
  const float* q_p = q.data_ptr<float>();
  const float* k_p = k_arena.data_ptr<float>();
  const float* v_p = v_arena.data_ptr<float>();
  float* o_p = out.data_ptr<float>();
  const int64_t q_split = at::native::q_split_for(g);
  const int64_t max_len = n ? *std::max_element(len_p, len_p + n) : 1;
  const int64_t buf_size = q_split * std::min<int64_t>(512, max_len) + 2 * q_split + q_split * d + 16;
  const auto scale_f = static_cast<float>(scale);
  const int64_t torch_threads = at::get_num_threads();
  auto body = [&](int64_t begin, int64_t end) {
    at::Tensor buf = at::empty({buf_size}, q.options());  // 64-byte aligned, as the SDPA call's buffer
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / h_kv, h = task % h_kv;
      const int64_t q_off = (row_p[i] * h_kv + h) * g * d;
      at::native::attend_one(q_p + q_off, d, k_p + slot_p[i] * k_arena.stride(0) + h * k_arena.stride(1),
                             v_p + slot_p[i] * v_arena.stride(0) + h * v_arena.stride(1), kv_stride, g, len_p[i],
                             d, scale_f, o_p + q_off, buf.data_ptr<float>(), h, h_kv, torch_threads);
    }
  };
  // The SDPA call runs its (head, query block) items in an OpenMP region when it has more than one, and
  // MKL then computes each sgemm on one thread; with a single item it calls MKL outside any region,
  // where MKL may split an sgemm across threads and round differently. Match that: this call's own
  // parallel region only where every SDPA call would have had one.
  const int64_t items_per_call = h_kv * at::native::divup(g, q_split);
  if (torch_threads > 1 && items_per_call == 1) {
    body(0, n * h_kv);
  } else {
    at::parallel_for(0, n * h_kv, 1, body);
  }
}

// The K/V writes of a step, into the paged pool or the contiguous rows, K and V in one call:
// k_dst[index[n] / block, h, index[n] % block, :] = k[n, h, :] for every new token n and head h (v likewise).
// k, v: [N, H, D]; k_dst, v_dst: [A, H, block, D] (the pool [blocks, block_size, H, D] seen through a
// permute, or the rows [slots, H, capacity, D]); the last dim contiguous everywhere, any other strides.
// A byte copy, so any dtype; index_copy_ spends most of its time per row, not per byte, on a decode step.
void scatter_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_dst, at::Tensor& v_dst,
                const at::Tensor& index, int64_t block) {
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu() && k_dst.device().is_cpu() && v_dst.device().is_cpu() &&
                  index.device().is_cpu(),
              "scatter_kv: CPU tensors only");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.stride(2) == 1 && v.stride(2) == 1,
              "scatter_kv: k and v must be [N, H, D] with a contiguous last dim");
  TORCH_CHECK(k_dst.dim() == 4 && v_dst.sizes() == k_dst.sizes() && k_dst.strides() == v_dst.strides() &&
                  k_dst.stride(3) == 1,
              "scatter_kv: k_dst and v_dst must be [A, H, block, D] of one layout with a contiguous last dim");
  TORCH_CHECK(k.scalar_type() == k_dst.scalar_type() && v.scalar_type() == k.scalar_type() &&
                  v_dst.scalar_type() == k.scalar_type(),
              "scatter_kv: all tensors must have one dtype");
  TORCH_CHECK(k_dst.size(1) == k.size(1) && k_dst.size(3) == k.size(2) && k_dst.size(2) == block,
              "scatter_kv: destination is not [A, H, block, D] for these heads and head size");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 && index.is_contiguous() &&
                  index.size(0) == k.size(0),
              "scatter_kv: index must be a contiguous int64 vector with one entry per token");
  const int64_t n = k.size(0), heads = k.size(1), limit = k_dst.size(0) * block;
  const int64_t* idx = index.data_ptr<int64_t>();
  for (const auto i : c10::irange(n)) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < limit, "scatter_kv: index ", idx[i], " out of range [0, ", limit, ")");
  }
  const int64_t es = k.element_size();
  const size_t row_bytes = static_cast<size_t>(k.size(2) * es);
  const std::array<const char*, 2> src = {static_cast<const char*>(k.data_ptr()),
                                          static_cast<const char*>(v.data_ptr())};
  const std::array<char*, 2> dst = {static_cast<char*>(k_dst.data_ptr()), static_cast<char*>(v_dst.data_ptr())};
  const std::array<int64_t, 2> src_n = {k.stride(0) * es, v.stride(0) * es};
  const std::array<int64_t, 2> src_h = {k.stride(1) * es, v.stride(1) * es};
  const int64_t dst_a = k_dst.stride(0) * es, dst_h = k_dst.stride(1) * es, dst_b = k_dst.stride(2) * es;
  for (const auto t : c10::irange(2)) {
    for (const auto i : c10::irange(n)) {
      char* row = dst[t] + (idx[i] / block) * dst_a + (idx[i] % block) * dst_b;
      const char* from = src[t] + i * src_n[t];
      for (const auto h : c10::irange(heads)) {
        std::memcpy(row + h * dst_h, from + h * src_h[t], row_bytes);
      }
    }
  }
}

// Rotary embedding as transformers' apply_rotary_pos_emb computes it in float32:
// out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]).
// Every element is two IEEE multiplies and one add, each rounded, which is what ATen's mul, neg, cat
// and add give; contraction into an FMA would round once instead, so it is off for this function.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
static void rope_rows(const float* __restrict__ x, int64_t x_t, int64_t x_h, const float* __restrict__ c,
                      const float* __restrict__ s, int64_t cs_t, float* __restrict__ out, int64_t t_len,
                      int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t t = 0; t < t_len; ++t) {
    const float* ct = c + t * cs_t;
    const float* st = s + t * cs_t;
    for (int64_t h = 0; h < heads; ++h) {
      const float* xr = x + t * x_t + h * x_h;
      float* o = out + (t * heads + h) * d;
      for (int64_t i = 0; i < half; ++i) {
        const float a = xr[i] * ct[i];
        const float b = (-xr[i + half]) * st[i];
        o[i] = a + b;
      }
      for (int64_t i = half; i < d; ++i) {
        const float a = xr[i] * ct[i];
        const float b = xr[i - half] * st[i];
        o[i] = a + b;
      }
    }
  }
}
#pragma GCC pop_options

// q [1, Hq, T, D], k [1, Hk, T, D] float32 (last dim contiguous, any other strides); cos, sin [1, T, D]
// (last dim contiguous, one layout). Returns the rotated q and k as [1, H, T, D] views of [1, T, H, D]
// memory, which is how the attention reads them ([T, H, D]).
std::vector<at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(),
              "rope: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat,
              "rope: float32 only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == 1 && k.size(0) == 1 && q.size(2) == k.size(2) &&
                  q.size(3) == k.size(3) && q.stride(3) == 1 && k.stride(3) == 1,
              "rope: q and k must be [1, H, T, D] with a contiguous last dim");
  const int64_t t_len = q.size(2), d = q.size(3);
  TORCH_CHECK(d % 2 == 0, "rope: the head size must be even");
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.strides() == sin.strides() && cos.size(0) == 1 &&
                  cos.size(1) == t_len && cos.size(2) == d && cos.stride(2) == 1,
              "rope: cos and sin must be [1, T, D] of one layout with a contiguous last dim");
  std::vector<at::Tensor> outs;
  for (const at::Tensor* x : {&q, &k}) {
    const int64_t heads = x->size(1);
    at::Tensor out = at::empty({1, t_len, heads, d}, x->options());
    rope_rows(x->data_ptr<float>(), x->stride(2), x->stride(1), cos.data_ptr<float>(), sin.data_ptr<float>(),
              cos.stride(1), out.data_ptr<float>(), t_len, heads, d);
    outs.push_back(out.transpose(1, 2));
  }
  return outs;
}

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

// F.silu(gate) * up in float32, in one pass instead of two ops and an intermediate tensor. ATen's silu
// kernel (aten/src/ATen/native/cpu/Activation.cpp) runs at the CPU capability torch dispatches to, as
// this extension is built: TensorIterator's vectorized loop takes 2 x Vectorized<float>::size() floats
// per iteration as x / (1 + exp(-x)) (SLEEF's expf), and the last numel % (2 x size) elements with the
// scalar x / (1 + std::exp(-x)), which rounds differently now and then. The same split here; checked
// against torch at load (cpu_ext._silu_mul_check). With more than one thread ATen splits tensors of
// >= GRAIN_SIZE elements into chunks, each with its own scalar tail; the caller uses this only where
// there is one chunk.
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.device().is_cpu() && up.device().is_cpu() && gate.scalar_type() == at::kFloat &&
                  up.scalar_type() == at::kFloat,
              "silu_mul: float32 CPU tensors only");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.is_contiguous() && up.is_contiguous(),
              "silu_mul: gate and up must be contiguous tensors of one shape");
  at::Tensor out = at::empty_like(gate);
  const int64_t n = gate.numel();
  const float* g = gate.data_ptr<float>();
  const float* u = up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  using Vec = at::vec::Vectorized<float>;
  const Vec one(1.0f);
  const int64_t step = 2 * Vec::size();
  const int64_t vec_end = n - n % step;  // TensorIterator's vectorized_loop: the rest goes to the scalar op
  int64_t i = 0;
  for (; i < vec_end; i += Vec::size()) {
    const Vec x = Vec::loadu(g + i);
    ((x / (one + x.neg().exp())) * Vec::loadu(u + i)).store(o + i);
  }
  for (; i < n; ++i) {
    const float x = g[i];
    const float s = x / (1.0f + std::exp(-x));
    o[i] = s * u[i];
  }
  return out;
}

// Linear layers with their weights packed once into MKL's internal layout. F.linear on the CPU calls MKL's
// sgemm, which repacks the weight on every call; for a decode step of a few tokens that copy costs as
// much as the multiply. Torch computes out [M, N] = x [M, K] @ W^T as the column-major product
// out^T = W^T' x^T (sgemm with A = W transposed, m = N, n = M, k = K); pack_weight packs that A, and
// packed_linear runs the same product on it, with torch's addmm convention for a bias (out starts as
// the broadcast bias, beta = 1). MKL takes other code paths for some shapes and token counts, so the
// caller (hf_turbo/kernels/packed.py) uses it only where it has compared it with F.linear bit for bit.
namespace {
constexpr int kColMajor = 102, kNoTrans = 111, kTrans = 112, kPacked = 151, kAMatrix = 161;
constexpr int kPackHint = 64;  // MKL's n at packing time (a token count); the packed layout serves any n
}  // namespace

bool packed_gemm_available() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr;
}

// w: [N, K] float32 contiguous. Returns the packed copy (a byte tensor).
at::Tensor pack_weight(const at::Tensor& w) {
  TORCH_CHECK(packed_gemm_available(), "pack_weight: this BLAS has no packed GEMM");
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous(),
              "pack_weight: w must be a contiguous float32 [N, K] CPU tensor");
  const int n = static_cast<int>(w.size(0)), k = static_cast<int>(w.size(1));
  TORCH_CHECK(n > 0 && k > 0, "pack_weight: empty weight");
  const size_t bytes = cblas_sgemm_pack_get_size(kAMatrix, n, kPackHint, k);
  at::Tensor buf = at::empty({static_cast<int64_t>(bytes)}, w.options().dtype(at::kByte));
  cblas_sgemm_pack(kColMajor, kAMatrix, kTrans, n, kPackHint, k, 1.0f, w.data_ptr<float>(), k,
                   reinterpret_cast<float*>(buf.data_ptr()));
  return buf;
}

// x: [..., K] float32 contiguous; packed: pack_weight of an [N, K] weight; bias: [N] or None.
// Returns [..., N] = F.linear(x, W, bias).
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t k,
                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(packed_gemm_available(), "packed_linear: this BLAS has no packed GEMM");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1 &&
                  x.size(-1) == k,
              "packed_linear: x must be a contiguous float32 CPU tensor whose last dim is ", k);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  static_cast<size_t>(packed.numel()) >=
                      cblas_sgemm_pack_get_size(kAMatrix, static_cast<int>(n), kPackHint, static_cast<int>(k)),
              "packed_linear: packed is not a packed [", n, ", ", k, "] weight");
  const int64_t m = k ? x.numel() / k : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor out;
  float beta = 0.0f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == n,
                "packed_linear: bias must be float32 [", n, "]");
    out = at::empty({m, n}, x.options());
    out.copy_(bias->expand({m, n}));  // never bias itself: contiguous() of the [1, N] expand would alias it
    beta = 1.0f;
  } else {
    out = at::empty({m, n}, x.options());
  }
  if (m > 0) {
    cblas_sgemm_compute(kColMajor, kPacked, kNoTrans, static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
                        reinterpret_cast<const float*>(packed.data_ptr()), static_cast<int>(k), x.data_ptr<float>(),
                        static_cast<int>(k), beta, out.data_ptr<float>(), static_cast<int>(n));
  }
  return out.view(shape);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("silu_mul", &silu_mul, "F.silu(gate) * up in one pass, bitwise (float32)");
  m.def("rms_norm", &rms_norm, "transformers' LlamaRMSNorm forward in one call, bitwise (float32)");
  m.def("packed_gemm_available", &packed_gemm_available, "whether MKL's packed GEMM API is present");
  m.def("pack_weight", &pack_weight, "pack an [N, K] float32 weight for packed_linear");
  m.def("packed_linear", &packed_linear, "F.linear(x, W, bias) on a packed weight");
  m.def("rope", &rope, "rotary embedding of q and k, as transformers' apply_rotary_pos_emb computes it (float32)");
  m.def("decode_attention", &decode_attention, "batched single-query attention over contiguous K/V rows");
  m.def("scatter_kv", &scatter_kv, "write a step's K/V rows into a pool or the contiguous rows (a byte copy)");
}
