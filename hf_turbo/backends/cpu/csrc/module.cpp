// The Python module of hf_turbo's CPU ops: one source file per op beside this one, bound here.
#include <torch/extension.h>

#include <vector>

void decode_attention(const at::Tensor& q, const at::Tensor& k_arena, const at::Tensor& v_arena,
                      const at::Tensor& rows, const at::Tensor& slots, const at::Tensor& lens, double scale,
                      at::Tensor& out);
void scatter_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_dst, at::Tensor& v_dst,
                const at::Tensor& index, int64_t block);
std::vector<at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);
bool packed_gemm_available();
at::Tensor pack_weight(const at::Tensor& w);
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t k,
                         const c10::optional<at::Tensor>& bias);

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
