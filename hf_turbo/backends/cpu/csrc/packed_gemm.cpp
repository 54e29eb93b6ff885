#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <vector>

// MKL's packed-GEMM API (cblas_sgemm_pack / cblas_sgemm_compute), also exported by libtorch_cpu. Weak, so
// that the extension still loads against a BLAS without them; packed_gemm_available() then says false.
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

// Linear layers with their weights packed once into MKL's internal layout. F.linear on the CPU calls MKL's
// sgemm, which repacks the weight on every call; for a decode step of a few tokens that copy costs as
// much as the multiply. Torch computes out [M, N] = x [M, K] @ W^T as the column-major product
// out^T = W^T' x^T (sgemm with A = W transposed, m = N, n = M, k = K); pack_weight packs that A, and
// packed_linear runs the same product on it, with torch's addmm convention for a bias (out starts as
// the broadcast bias, beta = 1). MKL takes other code paths for some shapes and token counts, so the
// caller (hf_turbo/backends/cpu/packed.py) uses it only where it has compared it with F.linear bit for bit.
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
