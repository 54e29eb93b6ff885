#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <array>
#include <cstring>

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
