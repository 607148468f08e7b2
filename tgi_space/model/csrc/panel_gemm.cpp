// Batch-invariant GEMM for CPUs without native bf16 GEMMs in oneDNN (AVX2: AMD Zen, older Intel):
// y [M, N] = x [M, K] @ W^T (+ bias), W packed once as panels of 16 output columns, [N / 16][K][16].
//
// Every output element is one fixed computation: acc = 0; for k = 0 .. K-1: acc = fma(x[m][k], w[k][n], acc);
// then (acc + bias[n]) rounded once to the output dtype. Its order depends on neither the row count M, nor
// the rows it is computed with (a micro-kernel takes 1 to ROWS rows), nor the thread that computes it, so a
// row gets the same bits whatever else is in the batch. Weights may be float32 or bf16 (bf16 -> float32 is
// exact: the bits shifted up; half the memory traffic of float32), activations likewise; products and sums
// are float32. Threads split the panels; within a panel, row blocks reuse the panel from L1/L2.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TGI_PANEL_AVX2 1
#else
#define TGI_PANEL_AVX2 0
#endif

#include <cmath>
#include <cstring>

namespace {

constexpr int64_t COLS = 16;  // output columns per panel (two 8-lane vectors)
constexpr int64_t ROWS = 6;   // rows per micro-kernel at most: 12 independent accumulators
constexpr int64_t ROW_CHUNK = 48;  // rows of x per pass over a task's panels (a multiple of ROWS)

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

#if TGI_PANEL_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // 8 bf16 -> float32, exactly
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// out[r][0..16) = sum over k, in order, of x[r][k] * panel[k][0..16) (one fma per term), for R rows.
template <int R, typename TX, typename TW>
void micro(const TX* const* x, const TW* panel, int64_t K, float (*out)[COLS]) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = load8(panel + k * COLS), w1 = load8(panel + k * COLS + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_set1_ps(to_float(x[r][k]));
      acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(out[r], acc[r][0]);
    _mm256_storeu_ps(out[r] + 8, acc[r][1]);
  }
}
#else
template <int R, typename TX, typename TW>
void micro(const TX* const* x, const TW* panel, int64_t K, float (*out)[COLS]) {  // the same bits, scalar
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < COLS; ++c) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(to_float(x[r][k]), to_float(panel[k * COLS + c]), acc);
      out[r][c] = acc;
    }
}
#endif

template <typename TX, typename TW>
void micro_rows(int rows, const TX* const* x, const TW* panel, int64_t K, float (*out)[COLS]) {
  switch (rows) {
    case 1: return micro<1>(x, panel, K, out);
    case 2: return micro<2>(x, panel, K, out);
    case 3: return micro<3>(x, panel, K, out);
    case 4: return micro<4>(x, panel, K, out);
    case 5: return micro<5>(x, panel, K, out);
    default: return micro<6>(x, panel, K, out);
  }
}

// One panel for rows [m_begin, m_end) of x: acc + bias, rounded once to TX, into y's columns of this panel.
template <typename TX, typename TW>
void panel_rows(const TX* x, int64_t m_begin, int64_t m_end, int64_t K, const TW* panel, const float* bias,
                int64_t col0, int64_t N, TX* y) {
  const int64_t cols = std::min(COLS, N - col0);
  float out[ROWS][COLS];
  const TX* rows[ROWS];
  for (int64_t m0 = m_begin; m0 < m_end; m0 += ROWS) {
    const int n = static_cast<int>(std::min(ROWS, m_end - m0));
    for (int r = 0; r < n; ++r) rows[r] = x + (m0 + r) * K;
    micro_rows(n, rows, panel, K, out);
    for (int r = 0; r < n; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const float v = bias ? out[r][c] + bias[col0 + c] : out[r][c];
        y[(m0 + r) * N + col0 + c] = static_cast<TX>(v);
      }
  }
}

template <typename TX, typename TW>
void run(const torch::Tensor& x, const torch::Tensor& panels, const float* bias, int64_t N, torch::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), num_panels = panels.size(0);
  const TX* xp = x.data_ptr<TX>();
  const TW* wp = panels.data_ptr<TW>();
  TX* yp = y.data_ptr<TX>();
  // grain: enough panels per task that a task streams ~64 KiB of weights
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, K * COLS * sizeof(TW)));
  at::parallel_for(0, num_panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += ROW_CHUNK)  // a chunk of x stays in L2 while the task's panels pass
      for (int64_t p = begin; p < end; ++p)
        panel_rows<TX, TW>(xp, m0, std::min(M, m0 + ROW_CHUNK), K, wp + p * K * COLS, bias, p * COLS, N, yp);
  });
}

}  // namespace

// W [N, K] (float32 or bf16) -> panels [ceil(N / 16), K, 16] of the same dtype, zero-padded past N.
torch::Tensor pack_panels(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "pack_panels: weight must be [N, K]");
  const int64_t N = weight.size(0), K = weight.size(1), P = (N + COLS - 1) / COLS;
  auto padded = torch::zeros({P * COLS, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  return padded.view({P, COLS, K}).transpose(1, 2).contiguous();
}

// x [M, K] @ W^T (+ bias) -> [M, N], x of the panels' dtype (float32 or bf16), W packed by pack_panels; or x
// float32 with bf16 panels (float32 weights that bf16 holds exactly: the same bits, half the weight traffic).
torch::Tensor panel_linear(const torch::Tensor& x_in, const torch::Tensor& panels, const c10::optional<torch::Tensor>& bias,
                           int64_t N) {
  TORCH_CHECK(x_in.dim() == 2 && panels.dim() == 3 && panels.size(2) == COLS, "panel_linear: x [M, K], panels [P, K, 16]");
  TORCH_CHECK(x_in.size(1) == panels.size(1), "panel_linear: x has ", x_in.size(1), " columns, W ", panels.size(1));
  const bool mixed = x_in.scalar_type() == torch::kFloat32 && panels.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(x_in.scalar_type() == panels.scalar_type() || mixed,
              "panel_linear: x and W must share a dtype (or x float32, W bf16)");
  const auto x = x_in.contiguous();
  auto y = torch::empty({x.size(0), N}, x.options());
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(torch::kFloat32).contiguous();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (x.size(0) == 0) return y;
  if (mixed) {
    run<float, c10::BFloat16>(x, panels, bp, N, y);
  } else if (x.scalar_type() == torch::kFloat32) {
    run<float, float>(x, panels, bp, N, y);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "panel_linear: float32 or bfloat16");
    run<c10::BFloat16, c10::BFloat16>(x, panels, bp, N, y);
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_panels", &pack_panels, "W [N, K] -> panels [ceil(N/16), K, 16] (CPU)");
  m.def("panel_linear", &panel_linear, "Batch-invariant x @ W^T (+ bias) on packed panels (CPU)");
}
