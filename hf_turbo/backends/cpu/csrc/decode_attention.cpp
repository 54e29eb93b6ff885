// Batched CPU decode attention over contiguous per-sequence K/V rows (hf_turbo/backends/cpu/rows.py).
//
// One call attends every single-query sequence of an engine step, instead of one
// scaled_dot_product_attention call per sequence. Each (sequence, KV head) pair runs the same float
// operations, in the same order, as PyTorch's CPU flash-attention kernel does for a call with
// q [1, H_kv, g, D] (the g query heads of one KV head as rows), k/v [1, H_kv, L, D], no mask, not
// causal: a q.k^T gemm per block of up to 512 keys, the fused scale+max and exp+sum vector loops,
// the online-softmax rescale, a p@v gemm, and one multiply by the reciprocal of the sum. It is built
// for the CPU capability PyTorch dispatches to (hf_turbo/backends/cpu/ext.py), which checks it
// against scaled_dot_product_attention bit for bit before the engine uses it.
#include <ATen/ATen.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

// MKL's Fortran sgemm, exported by libtorch_cpu: the routine at::native::cpublas::gemm calls for float
// (that wrapper itself is not exported).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

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
