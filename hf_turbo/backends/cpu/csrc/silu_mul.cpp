#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>

// F.silu(gate) * up in float32, in one pass instead of two ops and an intermediate tensor. ATen's silu
// kernel (aten/src/ATen/native/cpu/Activation.cpp) runs at the CPU capability torch dispatches to, as
// this extension is built: TensorIterator's vectorized loop takes 2 x Vectorized<float>::size() floats
// per iteration as x / (1 + exp(-x)) (SLEEF's expf), and the last numel % (2 x size) elements with the
// scalar x / (1 + std::exp(-x)), which rounds differently now and then. The same split here; checked
// against torch at load (ext._silu_mul_check). With more than one thread ATen splits tensors of
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
