#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <vector>

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
