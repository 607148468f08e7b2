// Fused, batch-invariant attention over a ragged batch and a paged KV cache (CPU).
//
// Work is split by (sequence, block of up to ROW_BLOCK rows, kv head). Each (query row, head) runs one
// fixed computation over the keys it may see, the cached prefix in position order and then the visible
// new rows of its own sequence, reading them where they are (cache slots or this step's rows):
//   score_j = scale * dot(q, k_j)  (W-lane partial sums over the head dimension, a fixed tree),
//   m = max of the visible scores,  p_j = exp_neg(score_j - m)  (0 for a hidden key),
//   total = p_j summed in key order,  out = (sum in key order of p_j v_j) / total.
// Every operation on a row's numbers is per lane (GCC vector extensions) or sequential, in a fixed
// order, and the file is built with -ffp-contract=off (no multiply-add is fused), so a row gets the
// same bits whatever else is in the batch, wherever its keys fall in a vector, and however the work is
// split over threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

namespace {

constexpr int64_t ROW_BLOCK = 16;  // query rows of one sequence per work item
constexpr int64_t W = 16;          // lanes of one vector: keys scored together, head-dimension chunk

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

typedef uint16_t vh __attribute__((vector_size(W * sizeof(uint16_t))));
typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t))));

inline vf load(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof(vf));
  return v;
}

inline vf load(const c10::BFloat16* p) {  // bf16 -> float32 is exact: the bits shifted up
  vh h;
  __builtin_memcpy(&h, p, sizeof(vh));
  const vu bits = __builtin_convertvector(h, vu) << 16;
  vf v;
  __builtin_memcpy(&v, &bits, sizeof(vf));
  return v;
}

inline vf load(const c10::Half* p) {
  float f[W];
  for (int64_t l = 0; l < W; ++l) f[l] = static_cast<float>(p[l]);
  return load(f);
}

inline void store(float* p, vf v) { __builtin_memcpy(p, &v, sizeof(vf)); }

inline float reduce(vf v) {  // a fixed pairwise tree over the lanes: lane l += lane l + width, width 8, 4, 2, 1
  v = v + __builtin_shuffle(v, vi{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v = v + __builtin_shuffle(v, vi{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v = v + __builtin_shuffle(v, vi{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v = v + __builtin_shuffle(v, vi{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}

// q . k over the head dimension: W-lane partial sums chunk by chunk, the rest lane by lane, then `reduce`.
// C > 0: the head dimension is C * W, known at compile time (the loops unroll; same arithmetic).
template <int64_t C, typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  vf lane = {};
  const int64_t whole = C > 0 ? C * W : d / W * W;
  for (int64_t i = 0; i < whole; i += W) lane = lane + load(q + i) * load(k + i);
  if (C == 0) {
    for (int64_t i = whole; i < d; ++i) lane[i - whole] = lane[i - whole] + q[i] * static_cast<float>(k[i]);
  }
  return reduce(lane);
}

// exp(x) for x <= 0, per lane: x = k ln2 + r with k = round(x / ln2) (by the 1.5 * 2^23 trick),
// exp(r) by a degree-6 Taylor polynomial in Horner form, times 2^k built in the exponent bits.
// Relative error < 3e-7; below -87 the result is 0.
inline vf exp_neg(vf x) {
  const vf lo = x < -87.0f ? vf{} + 1.0f : vf{};
  x = x < -87.0f ? vf{} - 87.0f : x;
  const vf magic = vf{} + 12582912.0f;
  const vf k = (x * 1.44269504088896341f + magic) - magic;
  const vf r = (x - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
  vf p = vf{} + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi bits = (__builtin_convertvector(k, vi) + 127) << 23;
  vf scale;
  __builtin_memcpy(&scale, &bits, sizeof(vf));
  const vf out = p * scale;
  return lo != 0.0f ? vf{} : out;
}

// One query (a row and a head) against its sequence's visible keys, for a head dimension that is
// not 64 or 128 (`attend_block` takes those); the same arithmetic as there; writes out[0 .. d).
template <typename T>
void attend(const float* qf, int64_t d, int64_t len, int64_t ctx, const uint8_t* visible, const T* const* keys,
            const T* const* values, float scale, float* s, float* a, T* out) {
  const int64_t padded = (len + W - 1) / W * W;
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < len; ++j) {
    s[j] = dot<0>(qf, keys[j], d) * scale;
    if (j < ctx || visible[j - ctx]) best = std::max(best, s[j]);
  }
  for (int64_t j = len; j < padded; ++j) s[j] = best;
  for (int64_t j0 = 0; j0 < padded; j0 += W) store(s + j0, exp_neg(load(s + j0) - best));
  float total = 0.f;
  for (int64_t j = 0; j < len; ++j) {  // hidden keys get an exact 0; the sum in key order
    if (j >= ctx && !visible[j - ctx]) s[j] = 0.f;
    total = total + s[j];
  }
  const int64_t whole = d / W * W;
  std::fill(a, a + d, 0.f);
  for (int64_t j = 0; j < len; ++j) {  // sum of p_j v_j in key order; p = 0 skipped
    const float pj = s[j];
    if (pj == 0.f) continue;
    const T* vj = values[j];
    for (int64_t i = 0; i < whole; i += W) store(a + i, load(a + i) + pj * load(vj + i));
    for (int64_t i = whole; i < d; ++i) a[i] = a[i] + pj * static_cast<float>(vj[i]);
  }
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<T>(a[i] / total);
}

// A block of queries (rows r0.. of one sequence, the heads of one kv head) with the head dimension
// C * W known at compile time: each key and value is converted once and used by every query of the
// block. Per query the arithmetic is exactly `attend`'s: the same dot, max, exp, key-order sums.
template <int64_t C, typename T>
void attend_block(const float* qf, int64_t m_count, int64_t group, int64_t len, int64_t ctx, int64_t n,
                  const uint8_t* visible, const T* const* keys, const T* const* values, float scale,
                  std::vector<float>& s, std::vector<float>& acc, const std::function<T*(int64_t)>& out) {
  constexpr int64_t D = C * W;
  const int64_t padded = (len + W - 1) / W * W;
  s.resize(m_count * padded);
  acc.assign(m_count * D, 0.f);
  for (int64_t j = 0; j < len; ++j) {
    vf k[C];
    for (int64_t c = 0; c < C; ++c) k[c] = load(keys[j] + c * W);
    for (int64_t m = 0; m < m_count; ++m) {
      vf lane = {};
      for (int64_t c = 0; c < C; ++c) lane = lane + load(qf + m * D + c * W) * k[c];
      s[m * padded + j] = reduce(lane) * scale;
    }
  }
  std::vector<float> total(m_count);
  for (int64_t m = 0; m < m_count; ++m) {
    float* sm = s.data() + m * padded;
    const uint8_t* vis = visible + (m / group) * n;
    float best = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < len; ++j) {
      if (j < ctx || vis[j - ctx]) best = std::max(best, sm[j]);
    }
    for (int64_t j = len; j < padded; ++j) sm[j] = best;
    for (int64_t j0 = 0; j0 < padded; j0 += W) store(sm + j0, exp_neg(load(sm + j0) - best));
    float sum = 0.f;
    for (int64_t j = 0; j < len; ++j) {
      if (j >= ctx && !vis[j - ctx]) sm[j] = 0.f;
      sum = sum + sm[j];
    }
    total[m] = sum;
  }
  for (int64_t j = 0; j < len; ++j) {
    vf v[C];
    for (int64_t c = 0; c < C; ++c) v[c] = load(values[j] + c * W);
    for (int64_t m = 0; m < m_count; ++m) {
      const float pj = s[m * padded + j];
      if (pj == 0.f) continue;
      float* a = acc.data() + m * D;
      for (int64_t c = 0; c < C; ++c) store(a + c * W, load(a + c * W) + pj * v[c]);
    }
  }
  for (int64_t m = 0; m < m_count; ++m) {
    T* o = out(m);
    for (int64_t i = 0; i < D; ++i) o[i] = static_cast<T>(acc[m * D + i] / total[m]);
  }
}

template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& k_new, const torch::Tensor& v_new,
         const torch::Tensor& cache, const torch::Tensor& cu_q, const torch::Tensor& cu_ctx,
         const torch::Tensor& prefix, const torch::Tensor& vis, const torch::Tensor& cu_vis,
         const torch::Tensor& items, double scale, torch::Tensor& out) {
  const int64_t heads = q.size(1), d = q.size(2);
  const int64_t kv_heads = k_new.size(1), group = heads / kv_heads;
  const int64_t slots = cache.size(1);
  const T* qp = q.data_ptr<T>();
  const T* knp = k_new.data_ptr<T>();
  const T* vnp = v_new.data_ptr<T>();
  const T* kcp = cache.data_ptr<T>();
  const T* vcp = kcp + slots * kv_heads * d;
  T* op = out.data_ptr<T>();
  const int64_t* cq = cu_q.data_ptr<int64_t>();
  const int64_t* cc = cu_ctx.data_ptr<int64_t>();
  const int64_t* pre = prefix.data_ptr<int64_t>();
  const uint8_t* vp = vis.data_ptr<uint8_t>();
  const int64_t* cv = cu_vis.data_ptr<int64_t>();
  const int64_t* work = items.data_ptr<int64_t>();  // [W, 2]: (sequence, first row of the block)
  const int64_t num_items = items.size(0);
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, num_items * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, scores, acc;
    std::vector<const T*> keys, values;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = work[2 * (item / kv_heads)], r0 = work[2 * (item / kv_heads) + 1], g = item % kv_heads;
      const int64_t n = cq[b + 1] - cq[b], ctx = cc[b + 1] - cc[b], len = ctx + n;
      const int64_t rows = std::min(ROW_BLOCK, n - r0);
      keys.resize(len);
      values.resize(len);
      for (int64_t j = 0; j < len; ++j) {  // the cached prefix in position order, then the new rows
        const int64_t at = j < ctx ? (pre[cc[b] + j] * kv_heads + g) * d : ((cq[b] + j - ctx) * kv_heads + g) * d;
        keys[j] = (j < ctx ? kcp : knp) + at;
        values[j] = (j < ctx ? vcp : vnp) + at;
      }
      qf.resize(rows * group * d);
      for (int64_t m = 0; m < rows * group; ++m) {  // query m: row r0 + m / group, head g * group + m % group
        const int64_t row = cq[b] + r0 + m / group, h = g * group + m % group;
        const T* qs = qp + (row * heads + h) * d;
        for (int64_t i = 0; i < d; ++i) qf[m * d + i] = static_cast<float>(qs[i]);
      }
      auto out_of = [&](int64_t m) { return op + ((cq[b] + r0 + m / group) * heads + g * group + m % group) * d; };
      const uint8_t* visible = vp + cv[b] + r0 * n;
      if (d == 64) {
        attend_block<4, T>(qf.data(), rows * group, group, len, ctx, n, visible, keys.data(), values.data(), fscale,
                           scores, acc, out_of);
      } else if (d == 128) {
        attend_block<8, T>(qf.data(), rows * group, group, len, ctx, n, visible, keys.data(), values.data(), fscale,
                           scores, acc, out_of);
      } else {
        for (int64_t m = 0; m < rows * group; ++m) {
          scores.resize((len + W - 1) / W * W);
          acc.resize(d);
          attend<T>(qf.data() + m * d, d, len, ctx, visible + (m / group) * n, keys.data(), values.data(), fscale,
                       scores.data(), acc.data(), out_of(m));
        }
      }
    }
  });
}

}  // namespace

torch::Tensor fused_attention(torch::Tensor q, torch::Tensor k_new, torch::Tensor v_new, torch::Tensor cache,
                              torch::Tensor cu_q, torch::Tensor cu_ctx, torch::Tensor prefix, torch::Tensor vis,
                              torch::Tensor cu_vis, torch::Tensor items, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_new.dim() == 3 && v_new.dim() == 3 && cache.dim() == 4, "fused_attention: bad ranks");
  TORCH_CHECK(q.scalar_type() == k_new.scalar_type() && q.scalar_type() == v_new.scalar_type() &&
                  q.scalar_type() == cache.scalar_type(),
              "fused_attention: q, k, v and the cache must share a dtype");
  TORCH_CHECK(q.size(1) % k_new.size(1) == 0, "fused_attention: heads must be a multiple of kv heads");
  TORCH_CHECK(cache.is_contiguous(), "fused_attention: the KV cache must be contiguous");
  TORCH_CHECK(items.scalar_type() == torch::kLong && cu_q.scalar_type() == torch::kLong && cu_ctx.scalar_type() == torch::kLong &&
                  prefix.scalar_type() == torch::kLong && cu_vis.scalar_type() == torch::kLong &&
                  vis.scalar_type() == torch::kByte,
              "fused_attention: index tensors must be int64 (visibility uint8)");
  q = q.contiguous();
  k_new = k_new.contiguous();
  v_new = v_new.contiguous();
  auto out = torch::empty_like(q);
  switch (q.scalar_type()) {
    case torch::kFloat:
      run<float>(q, k_new, v_new, cache, cu_q, cu_ctx, prefix, vis, cu_vis, items, scale, out);
      break;
    case torch::kBFloat16:
      run<c10::BFloat16>(q, k_new, v_new, cache, cu_q, cu_ctx, prefix, vis, cu_vis, items, scale, out);
      break;
    case torch::kHalf:
      run<c10::Half>(q, k_new, v_new, cache, cu_q, cu_ctx, prefix, vis, cu_vis, items, scale, out);
      break;
    default:
      TORCH_CHECK(false, "fused_attention: dtype must be float32, bfloat16 or float16");
  }
  return out;
}

// RMSNorm of each row of x [N, H]: r = 1 / sqrt(sum(x^2) / H + eps) with the sum in 16-lane partial
// sums and a fixed tree, then out = T(w * T(x * r)), as the reference module rounds (docs/lossless.md).
template <typename T>
void rms_rows(const T* x, const T* w, T* out, int64_t rows, int64_t h, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(h);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * h;
      for (int64_t i = 0; i < h; ++i) xf[i] = static_cast<float>(xr[i]);
      vf lane = {};
      const int64_t whole = h / W * W;
      for (int64_t i = 0; i < whole; i += W) {
        const vf v = load(xf.data() + i);
        lane = lane + v * v;
      }
      for (int64_t i = whole; i < h; ++i) lane[i - whole] = lane[i - whole] + xf[i] * xf[i];
      const float inv = 1.0f / std::sqrt(reduce(lane) / static_cast<float>(h) + eps);
      T* o = out + r * h;
      for (int64_t i = 0; i < h; ++i) {
        const float y = static_cast<float>(static_cast<T>(xf[i] * inv));
        o[i] = static_cast<T>(static_cast<float>(w[i]) * y);
      }
    }
  });
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && x.size(1) == weight.size(0), "rms_norm: x [N, H], weight [H]");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: x and weight must share a dtype");
  x = x.contiguous();
  weight = weight.contiguous();
  auto out = torch::empty_like(x);
  const auto n = x.size(0), h = x.size(1);
  const float e = static_cast<float>(eps);
  switch (x.scalar_type()) {
    case torch::kFloat:
      rms_rows<float>(x.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), n, h, e);
      break;
    case torch::kBFloat16:
      rms_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(),
                              out.data_ptr<c10::BFloat16>(), n, h, e);
      break;
    case torch::kHalf:
      rms_rows<c10::Half>(x.data_ptr<c10::Half>(), weight.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), n, h, e);
      break;
    default:
      TORCH_CHECK(false, "rms_norm: dtype must be float32, bfloat16 or float16");
  }
  return out;
}

// Rotary embedding (halves layout, as HF Llama) of x [N, heads, d] (any row stride; heads and d
// contiguous) by cos/sin [N, d / 2] (float32): out = [x1 c - x2 s, x2 c + x1 s] in float32, rounded once.
template <typename T>
void rotate_rows(const T* x, int64_t row_stride, const float* cos, const float* sin, T* out, int64_t rows,
                 int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* c = cos + r * half;
      const float* s = sin + r * half;
      for (int64_t h = 0; h < heads; ++h) {
        const T* xr = x + r * row_stride + h * d;
        T* o = out + (r * heads + h) * d;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = static_cast<float>(xr[i]), x2 = static_cast<float>(xr[i + half]);
          o[i] = static_cast<T>(x1 * c[i] - x2 * s[i]);
          o[i + half] = static_cast<T>(x2 * c[i] + x1 * s[i]);
        }
      }
    }
  });
}

torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "rotary: x [N, heads, d], inner dims contiguous");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat, "rotary: cos/sin float32");
  cos = cos.contiguous();
  sin = sin.contiguous();
  const auto n = x.size(0), heads = x.size(1), d = x.size(2);
  TORCH_CHECK(cos.numel() == n * (d / 2) && sin.numel() == n * (d / 2), "rotary: cos/sin [N, d / 2]");
  auto out = torch::empty({n, heads, d}, x.options());
  switch (x.scalar_type()) {
    case torch::kFloat:
      rotate_rows<float>(x.data_ptr<float>(), x.stride(0), cos.data_ptr<float>(), sin.data_ptr<float>(),
                         out.data_ptr<float>(), n, heads, d);
      break;
    case torch::kBFloat16:
      rotate_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), x.stride(0), cos.data_ptr<float>(),
                                 sin.data_ptr<float>(), out.data_ptr<c10::BFloat16>(), n, heads, d);
      break;
    case torch::kHalf:
      rotate_rows<c10::Half>(x.data_ptr<c10::Half>(), x.stride(0), cos.data_ptr<float>(), sin.data_ptr<float>(),
                             out.data_ptr<c10::Half>(), n, heads, d);
      break;
    default:
      TORCH_CHECK(false, "rotary: dtype must be float32, bfloat16 or float16");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_attention", &fused_attention, "Fused batch-invariant attention (CPU)");
  m.def("rms_norm", &rms_norm, "Row-wise RMSNorm (CPU)");
  m.def("rotary", &rotary, "Rotary embedding, halves layout (CPU)");
}
