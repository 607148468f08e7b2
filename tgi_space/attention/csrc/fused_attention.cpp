// Fused, batch-invariant attention over a ragged batch and a paged KV cache (CPU), and the step's other
// row-wise kernels (RMSNorm with the residual add, SwiGLU, rotary, the K/V store, gated adapter deltas,
// the logits' best two tokens and logsumexp).
//
// Attention work is split by (sequence, block of up to ROW_BLOCK rows, kv head), handed out to the
// threads one item at a time. An item transposes its sequence's visible keys TILE at a time (head
// dimension by key: in float32, or in bf16 pairs for AMX tiles) and runs each (query row, head) as one
// fixed computation over the keys it may see, the cached prefix in position order and then the visible
// new rows of its own sequence:
//   score_j = scale * (sum over i of q_i k_ji: per lane = key, one fused multiply-add per term in order;
//             bf16 with AMX: TDPBF16PS tiles, where an element depends on its own query and key only),
//   m = max of the visible scores,  p_j = exp_neg(score_j - m)  (0 for a hidden key),
//   total = each visible p_j added to lane (its position mod W) in position order, then a fixed tree,
//   out = (sum over keys in key order of p_j v_j, one fused multiply-add per key; bf16 with AMX: the
//          keys AMX_LAG positions behind the row first, on tiles of 32 position-aligned keys) / total.
// Every operation on a row's numbers is per lane (GCC vector extensions; fused multiply-adds are
// explicit, nothing else is contracted: -ffp-contract=off), per tile element, or in a fixed order, so a
// row gets the same bits whatever else is in the batch, wherever its keys fall in a vector or a tile, and
// however the work is split over threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__) || (defined(__AVX__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#define TGI_AMX 1  // bf16 attention on AMX tiles (attend_block_amx)
#else
#define TGI_AMX 0
#endif

#include <sys/syscall.h>
#include <unistd.h>

#include <array>
#include <algorithm>
#include <atomic>
#include <type_traits>
#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t ROW_BLOCK = 16;   // query rows of one sequence per work item
#if defined(__AVX512F__)
constexpr int64_t W = 16;           // lanes of one vector: keys scored together, head-dimension chunk
#else
constexpr int64_t W = 8;            // one 256-bit register (AVX2): GCC splits wider vectors badly (measured 10x
                                    // slower); a row's bits depend on W, and W is fixed per build
#endif
constexpr int64_t MAX_CHUNKS = 256 / W;  // head dimension at most 256
constexpr int64_t AMX_LAG = 48;     // keys this far behind a row may be summed on AMX tiles (attend_block_amx);
                                    // >= the rows a step holds past a leading chain: max_tree_depth (<= 32) + k (<= 16)
constexpr int64_t TILE = 64;        // keys transposed at a time (a multiple of W; with d = 64, 16 KiB of float32)

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

// v rounded to T (round to nearest even, as c10's conversions) and back to float32, per lane.
template <typename T>
inline vf rounded(vf v);

template <>
inline vf rounded<float>(vf v) { return v; }

template <>
inline vf rounded<c10::BFloat16>(vf v) {
  vu bits;
  __builtin_memcpy(&bits, &v, sizeof(vf));
  bits = ((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16) << 16;
  bits = v != v ? vu{} + 0x7FC00000u : bits;  // NaN stays a (quiet) NaN
  vf out;
  __builtin_memcpy(&out, &bits, sizeof(vf));
  return out;
}

template <>
inline vf rounded<c10::Half>(vf v) {
  for (int64_t l = 0; l < W; ++l) v[l] = static_cast<float>(static_cast<c10::Half>(v[l]));
  return v;
}

// Store v as W values of T (rounded as `rounded` rounds).
inline void store(c10::BFloat16* p, vf v) {
  vu bits;
  const vf r = rounded<c10::BFloat16>(v);
  __builtin_memcpy(&bits, &r, sizeof(vf));
  const vh h = __builtin_convertvector(bits >> 16, vh);
  __builtin_memcpy(p, &h, sizeof(vh));
}

inline void store(c10::Half* p, vf v) {
  for (int64_t l = 0; l < W; ++l) p[l] = static_cast<c10::Half>(v[l]);
}

// a * b + c per lane with one rounding (the hardware instruction where there is one, else std::fma:
// the same bits either way).
inline vf fma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return reinterpret_cast<vf>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                              reinterpret_cast<__m512>(c)));
#elif defined(__AVX__) && defined(__FMA__)  // AVX2 CPUs: W = 8, one register
  return reinterpret_cast<vf>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                              reinterpret_cast<__m256>(c)));
#else
  vf r;
  for (int64_t l = 0; l < W; ++l) r[l] = std::fma(a[l], b[l], c[l]);
  return r;
#endif
}

inline float reduce(vf v) {  // a fixed pairwise tree over the lanes: lane l += lane l + width, width W/2 .. 1
#if defined(__AVX512F__)
  v = v + __builtin_shuffle(v, vi{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v = v + __builtin_shuffle(v, vi{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v = v + __builtin_shuffle(v, vi{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v = v + __builtin_shuffle(v, vi{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
#else
  v = v + __builtin_shuffle(v, vi{4, 5, 6, 7, 0, 1, 2, 3});
  v = v + __builtin_shuffle(v, vi{2, 3, 0, 1, 6, 7, 4, 5});
  v = v + __builtin_shuffle(v, vi{1, 0, 3, 2, 5, 4, 7, 6});
#endif
  return v[0];
}

inline float reduce_max(vf v) {  // max is exact: any order gives the same value
  float best = v[0];
  for (int64_t l = 1; l < W; ++l) best = std::max(best, v[l]);
  return best;
}

// exp(x) for x <= 0, per lane: x = k ln2 + r with k = round(x / ln2) (by the 1.5 * 2^23 trick),
// exp(r) by a degree-6 Taylor polynomial in Horner form, times 2^k built in the exponent bits.
// Relative error < 3e-7; below -87 (and for -inf) the result is 0.
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

// One stage of a 16 x 16 transpose: rows t and t + s swap their off-diagonal s-lane blocks.
template <int S>
inline void transpose_stage(vf* r) {
  vi lo, hi;
  for (int l = 0; l < W; ++l) {
    lo[l] = (l & S) == 0 ? l : W + l - S;
    hi[l] = (l & S) == 0 ? l + S : W + l;
  }
  for (int t = 0; t < W; ++t) {
    if (t & S) continue;
    const vf a = r[t], b = r[t + S];
    r[t] = __builtin_shuffle(a, b, lo);
    r[t + S] = __builtin_shuffle(a, b, hi);
  }
}

// Keys j0 .. j0 + count (count <= TILE, a multiple of W) of one kv head, transposed to float32 kt [d][TILE]
// (keys past `len` are 0). Conversion is exact, so the layout changes no value.
template <typename T>
void transpose_keys(const T* const* keys, int64_t j0, int64_t count, int64_t len, int64_t d, float* kt) {
  vf tile[W];
  for (int64_t b = 0; b < count; b += W) {
    for (int64_t c = 0; c < d; c += W) {
      for (int64_t t = 0; t < W; ++t) {
        const int64_t j = j0 + b + t;
        if (j < len && c + W <= d) {
          tile[t] = load(keys[j] + c);
        } else {
          tile[t] = vf{};
          for (int64_t i = c; j < len && i < d; ++i) tile[t][i - c] = static_cast<float>(keys[j][i]);
        }
      }
      if constexpr (W == 16) transpose_stage<8>(tile);
      transpose_stage<4>(tile);
      transpose_stage<2>(tile);
      transpose_stage<1>(tile);
      for (int64_t i = 0; i < W && c + i < d; ++i) store(kt + (c + i) * TILE + b, tile[i]);
    }
  }
}

// Scores of Q queries (rows of qf, stride dp) against U blocks of W transposed keys, scaled, into s
// (row stride `stride`): per lane, the terms q_i k_ji added in the order of i.
template <int Q, int U>
inline void score_tile(const float* qf, int64_t dp, const float* kt, int64_t d, float scale, float* s,
                       int64_t stride) {
  vf acc[Q][U] = {};
  for (int64_t i = 0; i < d; ++i) {
    vf k[U];
    for (int u = 0; u < U; ++u) k[u] = load(kt + i * TILE + u * W);
    for (int q = 0; q < Q; ++q) {
      const vf qi = vf{} + qf[q * dp + i];
      for (int u = 0; u < U; ++u) acc[q][u] = fma(qi, k[u], acc[q][u]);
    }
  }
  for (int q = 0; q < Q; ++q) {
    for (int u = 0; u < U; ++u) store(s + q * stride + u * W, acc[q][u] * scale);
  }
}

#if defined(__AVX512F__)
constexpr int64_t SCORE_BLOCKS = 4;  // key blocks of W scored per pass: Q x 4 accumulators in registers
#else
constexpr int64_t SCORE_BLOCKS = 4;  // AVX2 (W = 8): 2 queries x 4 blocks of accumulators, 4 of keys
#endif

template <int Q>
inline void score_queries(const float* qf, int64_t dp, const float* kt, int64_t blocks, int64_t d, float scale,
                          float* s, int64_t stride) {
  for (int64_t u = 0; u < blocks; u += SCORE_BLOCKS) {  // a score's terms do not depend on the pass
    switch (std::min(SCORE_BLOCKS, blocks - u)) {
      case 4: score_tile<Q, 4>(qf, dp, kt + u * W, d, scale, s + u * W, stride); break;
      case 3: score_tile<Q, 3>(qf, dp, kt + u * W, d, scale, s + u * W, stride); break;
      case 2: score_tile<Q, 2>(qf, dp, kt + u * W, d, scale, s + u * W, stride); break;
      default: score_tile<Q, 1>(qf, dp, kt + u * W, d, scale, s + u * W, stride);
    }
  }
}

// Scores -> probabilities in place (hidden keys and padding get exactly 0); returns their total: W lanes,
// a visible key added to lane (its position mod W) in position order (the cached prefix a vector at a
// time, the new rows one by one), then the fixed tree. A key's position is the number of visible keys
// before it, so the total does not depend on hidden keys between visible ones, nor on which keys
// are cached.
inline float softmax(float* s, int64_t len, int64_t padded, int64_t ctx, const uint8_t* visible) {
  const float none = -std::numeric_limits<float>::infinity();
  for (int64_t j = ctx; j < len; ++j) {
    if (!visible[j - ctx]) s[j] = none;
  }
  for (int64_t j = len; j < padded; ++j) s[j] = none;
  vf top = vf{} + none;
  for (int64_t j0 = 0; j0 < padded; j0 += W) {
    const vf x = load(s + j0);
    top = x > top ? x : top;
  }
  const float best = reduce_max(top);
  vf lanes = {};
  for (int64_t j0 = 0; j0 < padded; j0 += W) {
    const vf p = exp_neg(load(s + j0) - best);
    store(s + j0, p);
    if (j0 < ctx) {
      vi lane;
      for (int l = 0; l < W; ++l) lane[l] = l;
      lanes = lanes + (lane < static_cast<int32_t>(ctx - j0) ? p : vf{});
    }
  }
  int64_t pos = ctx;
  for (int64_t j = ctx; j < len; ++j) {
    if (visible[j - ctx]) lanes[pos++ % W] += s[j];
  }
  return reduce(lanes);
}

// acc_q += p_qj v_j for keys j0 .. j1 in order (one fused multiply-add per key and lane), Q queries;
// acc [Q][dp] in memory between calls, so a query's sum does not depend on where the calls split it.
template <int Q, int64_t C, typename T>
inline void weigh(const float* s, int64_t stride, const T* const* values, int64_t j0, int64_t j1, int64_t d,
                  int64_t dp, float* acc) {
  constexpr int64_t N = C > 0 ? C : MAX_CHUNKS;
  const int64_t chunks = C > 0 ? C : dp / W;
  vf a[Q][N];
  for (int q = 0; q < Q; ++q) {
    for (int64_t c = 0; c < chunks; ++c) a[q][c] = load(acc + q * dp + c * W);
  }
  float tail[W] = {};
  for (int64_t j = j0; j < j1; ++j) {
    vf v[N];
    for (int64_t c = 0; c < chunks; ++c) {
      if (c * W + W <= d) {
        v[c] = load(values[j] + c * W);
      } else {
        for (int64_t i = c * W; i < d; ++i) tail[i - c * W] = static_cast<float>(values[j][i]);
        v[c] = load(tail);
      }
    }
    for (int q = 0; q < Q; ++q) {
      const vf p = vf{} + s[q * stride + j];
      for (int64_t c = 0; c < chunks; ++c) a[q][c] = fma(p, v[c], a[q][c]);
    }
  }
  for (int q = 0; q < Q; ++q) {
    for (int64_t c = 0; c < chunks; ++c) store(acc + q * dp + c * W, a[q][c]);
  }
}

#if TGI_AMX
// bf16 on CPUs with AMX: the same computation with AMX tile products (TDPBF16PS: a 16 x 32 bf16 tile times
// a 32 x 16 tile in pairs, accumulated into 16 x 16 float32; each output element depends only on its own
// row of the left tile and column of the right one). Keys stay bf16, transposed by pairs of dimensions
// (a 32-bit unit: the 16 x 16 transpose above moves bits only), which is the right tile's layout;
// probabilities are rounded to bf16 (round to nearest even) before P V, as a bf16 SDPA does; the total
// and the division stay float32. Per row the arithmetic is still fixed: a row's scores and outputs do
// not depend on the other rows of its tile.

// Keys j0 .. j0 + count as bf16 pairs, transposed: kt [d / 2][TILE] 32-bit units (keys past len are 0).
inline void transpose_key_pairs(const c10::BFloat16* const* keys, int64_t j0, int64_t count, int64_t len, int64_t d,
                                float* kt) {
  vf tile[W];
  for (int64_t b = 0; b < count; b += W) {
    for (int64_t c = 0; c < d / 2; c += W) {
      for (int64_t t = 0; t < W; ++t) {
        const int64_t j = j0 + b + t;
        if (j < len) {
          __builtin_memcpy(&tile[t], keys[j] + 2 * c, sizeof(vf));
        } else {
          tile[t] = vf{};
        }
      }
      transpose_stage<8>(tile);
      transpose_stage<4>(tile);
      transpose_stage<2>(tile);
      transpose_stage<1>(tile);
      for (int64_t i = 0; i < W; ++i) store(kt + (c + i) * TILE + b, tile[i]);
    }
  }
}

// Values of keys 0 .. count (count a multiple of 32, keys below it all exist) in pairs of keys, the
// right-hand tile layout of P V: vp [pair][chunk] holds, for W dimensions, (v_2p[i], v_2p+1[i]).
inline void pair_values(const c10::BFloat16* const* values, int64_t count, int64_t d, vf* vp) {
  const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                       37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const int64_t chunks = d / W;
  for (int64_t j = 0; j < count; j += 2) {
    for (int64_t c = 0; c < chunks; ++c) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values[j] + c * W));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values[j + 1] + c * W));
      vp[j / 2 * chunks + c] = reinterpret_cast<vf>(
          _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), idx, _mm512_castsi256_si512(b)));
    }
  }
}

// Row m's probabilities of keys 0 .. bound rounded to bf16 (round to nearest even), 0 from bound to count.
inline void round_probabilities(const float* s, int64_t bound, int64_t count, uint16_t* pb) {
  for (int64_t j0 = 0; j0 < bound; j0 += W) {
    const __m256bh h = _mm512_cvtneps_pbh(reinterpret_cast<__m512>(load(s + j0)));
    __builtin_memcpy(pb + j0, &h, sizeof(h));
  }
  std::fill(pb + bound, pb + count, 0);
}

struct TileConfig {  // palette 1: every tile 16 rows of 64 bytes
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// Our tile configuration for the life of the scope, and whatever was configured before it afterwards:
// oneDNN's AMX GEMMs on the same thread keep their own configuration loaded between calls.
class TileScope {
 public:
  TileScope() {
    _tile_storeconfig(&saved_);
    const TileConfig ours;
    _tile_loadconfig(&ours);
  }
  ~TileScope() {
    if (saved_.palette != 0) {
      _tile_loadconfig(&saved_);
    } else {
      _tile_release();
    }
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  alignas(64) TileConfig saved_;
};

inline bool amx_permitted() {  // Linux hands out AMX state on request, once per process
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}
using TileScopeOrNone = TileScope;
#else
struct TileScopeOrNone {};  // no AMX in this build: nothing to set up
#endif

struct Scratch {
  std::vector<float> kt, qf, s, acc, total;
  std::vector<uint16_t> qb, pb;  // the AMX path: queries as bf16 bits; rounded probabilities
  std::vector<vf> vp;            // the AMX path: values in pairs of keys
  std::vector<int64_t> bound;    // the AMX path: each query's AMX bound
  std::vector<float> tile_out = std::vector<float>(16 * 4 * W);  // one row block of 4 accumulator tiles
};

// One work item: m_count queries, the rows r0.. of one sequence and the heads of one kv head (query m is
// row m / group), over the sequence's len keys (ctx cached, then its n new rows).
template <typename T>
struct Block {
  int64_t m_count, group, len, ctx, n, d, dp, padded;
  const uint8_t* visible;  // [rows, n]: which new rows each row sees
  const T* const* keys;
  const T* const* values;
  float scale;
  std::function<T*(int64_t)> out;  // query m's output row
};

// Queries in registers per tile: with AVX-512 (32 registers) 4 (head dimension 64), 2 (128), 1 (any other);
// with AVX2 (16 registers, W = 8) P V takes 1 query at a time (a head of 64 is 8 accumulators) and scores 2.
// How queries are grouped changes no bit.
#if defined(__AVX512F__)
template <int64_t C>
constexpr int QUERIES = C > 0 && C <= 4 ? 4 : C > 0 ? 2 : 1;
template <int64_t C>
constexpr int SCORE_QUERIES = QUERIES<C>;
#else
template <int64_t C>
constexpr int QUERIES = 1;
template <int64_t C>
constexpr int SCORE_QUERIES = 2;
#endif

// acc[m] += p_mj v_j for the keys j from `from` on, every query, TILE keys at a time (weigh's order).
template <int64_t C, typename T>
void weigh_all(Scratch& w, const Block<T>& b, int64_t from) {
  constexpr int Q = QUERIES<C>;
  for (int64_t j0 = from / TILE * TILE; j0 < b.len; j0 += TILE) {
    const int64_t j = std::max(j0, from), j1 = std::min(b.len, j0 + TILE);
    for (int64_t m = 0; m < b.m_count; m += Q) {
      const float* sm = w.s.data() + m * b.padded;
      float* am = w.acc.data() + m * b.dp;
      switch (std::min<int64_t>(Q, b.m_count - m)) {
        case 4: weigh<C <= 4 ? 4 : 1, C, T>(sm, b.padded, b.values, j, j1, b.d, b.dp, am); break;
        case 3: weigh<C <= 4 ? 3 : 1, C, T>(sm, b.padded, b.values, j, j1, b.d, b.dp, am); break;
        case 2: weigh<2, C, T>(sm, b.padded, b.values, j, j1, b.d, b.dp, am); break;
        default: weigh<1, C, T>(sm, b.padded, b.values, j, j1, b.d, b.dp, am);
      }
    }
  }
}

template <typename T>
void softmax_all(Scratch& w, const Block<T>& b) {
  for (int64_t m = 0; m < b.m_count; ++m) {
    w.total[m] = softmax(w.s.data() + m * b.padded, b.len, b.padded, b.ctx, b.visible + (m / b.group) * b.n);
  }
}

template <typename T>
void write_out(const Scratch& w, const Block<T>& b) {
  for (int64_t m = 0; m < b.m_count; ++m) {
    T* o = b.out(m);
    const float* a = w.acc.data() + m * b.dp;
    for (int64_t i = 0; i < b.d; ++i) o[i] = static_cast<T>(a[i] / w.total[m]);
  }
}

// Scores of every query (w.qf, float32) in float32: keys taken TILE at a time (transposed once, then
// used by every query from L1).
template <int64_t C, typename T>
void scores_all(Scratch& w, const Block<T>& b) {
  constexpr int Q = SCORE_QUERIES<C>;
  for (int64_t j0 = 0; j0 < b.padded; j0 += TILE) {
    const int64_t count = std::min(TILE, b.padded - j0);
    transpose_keys<T>(b.keys, j0, count, b.len, b.d, w.kt.data());
    for (int64_t m = 0; m < b.m_count; m += Q) {
      const float* qm = w.qf.data() + m * b.dp;
      float* sm = w.s.data() + m * b.padded + j0;
      switch (std::min<int64_t>(Q, b.m_count - m)) {
        case 4: score_queries<4>(qm, b.dp, w.kt.data(), count / W, b.d, b.scale, sm, b.padded); break;
        case 3: score_queries<3>(qm, b.dp, w.kt.data(), count / W, b.d, b.scale, sm, b.padded); break;
        case 2: score_queries<2>(qm, b.dp, w.kt.data(), count / W, b.d, b.scale, sm, b.padded); break;
        default: score_queries<1>(qm, b.dp, w.kt.data(), count / W, b.d, b.scale, sm, b.padded);
      }
    }
  }
}

// The float32 path. Per query the arithmetic is fixed: it does not depend on m_count, on the queries
// it is grouped with, or on where the block starts.
template <int64_t C, typename T>
void attend_block(Scratch& w, const Block<T>& b) {
  scores_all<C, T>(w, b);
  softmax_all(w, b);
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  weigh_all<C, T>(w, b, 0);
  write_out(w, b);
}

#if TGI_AMX
using Bf16Block = Block<c10::BFloat16>;

// Scores of every query (w.qb, bf16 bits [rows16][D], zero rows up to a multiple of 16) on AMX tiles,
// 16 queries by 16 keys; not yet scaled.
template <int64_t C>
void scores_amx(Scratch& w, const Bf16Block& b) {
  constexpr int64_t D = C * W, KC = D / 32;  // KC chunks of 32 dimensions (tiles 4 .. 4 + KC - 1, KC <= 4)
  static_assert(KC <= 4, "at most 4 query chunks in tiles");
  for (int64_t j0 = 0; j0 < b.padded; j0 += TILE) {
    const int64_t count = std::min(TILE, b.padded - j0);
    transpose_key_pairs(b.keys, j0, count, b.len, D, w.kt.data());
    for (int64_t mt = 0; mt < (b.m_count + 15) / 16; ++mt) {
      const uint16_t* qm = w.qb.data() + mt * 16 * D;
      _tile_loadd(4, qm, D * 2);
      _tile_loadd(5, qm + 32, D * 2);
      if (KC > 2) {
        _tile_loadd(6, qm + 64, D * 2);
        _tile_loadd(7, qm + 96, D * 2);
      }
      for (int64_t u = 0; u < count; u += W) {  // 16 keys: scores [16 queries][16 keys]
        _tile_zero(0);
        for (int64_t c = 0; c < KC; ++c) {
          _tile_loadd(2, w.kt.data() + c * 16 * TILE + u, TILE * 4);
          switch (c) {
            case 0: _tile_dpbf16ps(0, 4, 2); break;
            case 1: _tile_dpbf16ps(0, 5, 2); break;
            case 2: _tile_dpbf16ps(0, 6, 2); break;
            default: _tile_dpbf16ps(0, 7, 2);
          }
        }
        _tile_stored(0, w.s.data() + mt * 16 * b.padded + j0 + u, b.padded * 4);
      }
    }
  }
}

// Each query's AMX bound, B(P) = the multiple of 32 at or below P - AMX_LAG for a row at position P
// (its number of visible keys - 1), in w.bound; returns (the largest, the smallest). B depends on the
// row's position only, and the keys below it sit at index = position in every layout (the cached prefix
// or the step's leading chain; a tree is never AMX_LAG deep), so plain decoding and any speculative
// step tile them alike.
inline std::pair<int64_t, int64_t> amx_bounds(Scratch& w, const Bf16Block& b) {
  w.bound.resize(b.m_count);
  int64_t most = 0, least = b.len;
  for (int64_t m = 0; m < b.m_count; ++m) {
    const uint8_t* vis = b.visible + (m / b.group) * b.n;
    int64_t seen = 0, first_hidden = b.n;
    for (int64_t j = 0; j < b.n; ++j) {
      seen += vis[j];
      if (!vis[j] && first_hidden == b.n) first_hidden = j;
    }
    const int64_t position = b.ctx + seen - 1;
    w.bound[m] = std::min(std::max<int64_t>(0, position - AMX_LAG) / 32 * 32, (b.ctx + first_hidden) / 32 * 32);
    most = std::max(most, w.bound[m]);
    least = std::min(least, w.bound[m]);
  }
  return {most, least};
}

// acc = P V over each query's keys below its bound (most: the largest bound), on AMX tiles, 32 keys at
// a time with the probabilities rounded to bf16; those probabilities are then set to 0 in w.s.
template <int64_t C>
void weigh_amx(Scratch& w, const Bf16Block& b, int64_t most) {
  constexpr int64_t D = C * W;
  w.vp.resize(most / 2 * C);
  pair_values(b.values, most, D, w.vp.data());
  w.pb.assign((b.m_count + 15) / 16 * 16 * most, 0);
  for (int64_t m = 0; m < b.m_count; ++m) {
    round_probabilities(w.s.data() + m * b.padded, w.bound[m], most, w.pb.data() + m * most);
  }
  for (int64_t mt = 0; mt < (b.m_count + 15) / 16; ++mt) {
    int64_t tile_most = 0;
    for (int64_t m = mt * 16; m < std::min(b.m_count, mt * 16 + 16); ++m) tile_most = std::max(tile_most, w.bound[m]);
    for (int64_t c0 = 0; c0 < C; c0 += 4) {  // 4 accumulator tiles of W dimensions at a time
      const int64_t cs = std::min<int64_t>(4, C - c0);
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t jj = 0; jj < tile_most; jj += 32) {
        _tile_loadd(4, w.pb.data() + mt * 16 * most + jj, most * 2);
        const vf* v = w.vp.data() + jj / 2 * C + c0;
        _tile_loadd(5, v, C * 64);
        _tile_dpbf16ps(0, 4, 5);
        if (cs > 1) {
          _tile_loadd(5, v + 1, C * 64);
          _tile_dpbf16ps(1, 4, 5);
        }
        if (cs > 2) {
          _tile_loadd(5, v + 2, C * 64);
          _tile_dpbf16ps(2, 4, 5);
        }
        if (cs > 3) {
          _tile_loadd(5, v + 3, C * 64);
          _tile_dpbf16ps(3, 4, 5);
        }
      }
      float* am = w.tile_out.data();
      _tile_stored(0, am, 4 * W * 4);
      _tile_stored(1, am + W, 4 * W * 4);
      _tile_stored(2, am + 2 * W, 4 * W * 4);
      _tile_stored(3, am + 3 * W, 4 * W * 4);
      for (int64_t r = 0; r < 16 && mt * 16 + r < b.m_count; ++r) {
        std::copy(am + r * 4 * W, am + r * 4 * W + cs * W, w.acc.data() + (mt * 16 + r) * D + c0 * W);
      }
    }
  }
  for (int64_t m = 0; m < b.m_count; ++m) std::fill(w.s.data() + m * b.padded, w.s.data() + m * b.padded + w.bound[m], 0.f);
}

// The AMX path (bf16, head dimension C * W). P V: the keys below a row's bound on AMX tiles
// (weigh_amx), the keys from it on through the float32 path, where a hidden key adds an exact 0 (a
// tile's sum would depend on where hidden keys fall between visible ones; tests: hidden keys).
template <int64_t C>
void attend_block_amx(Scratch& w, const Bf16Block& b) {
  scores_amx<C>(w, b);
  for (int64_t m = 0; m < b.m_count; ++m) {
    float* sm = w.s.data() + m * b.padded;
    for (int64_t j = 0; j < b.padded; j += W) store(sm + j, load(sm + j) * b.scale);
  }
  softmax_all(w, b);
  const auto [most, least] = amx_bounds(w, b);
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  if (most > 0) weigh_amx<C>(w, b, most);
  weigh_all<C, c10::BFloat16>(w, b, least);
  write_out(w, b);
}
#endif

// One item on the path this build and dtype take; `tiles` is set up by a thread's first AMX item.
template <typename T>
void attend_item(Scratch& w, const Block<T>& b, const T* const* queries, std::optional<TileScopeOrNone>& tiles) {
#if TGI_AMX
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    if ((b.d == 64 || b.d == 128) && amx_permitted()) {
      const int64_t m_rows = (b.m_count + 15) / 16 * 16;
      w.qb.assign(m_rows * b.d, 0);
      for (int64_t m = 0; m < b.m_count; ++m) __builtin_memcpy(w.qb.data() + m * b.d, queries[m], b.d * sizeof(uint16_t));
      w.s.resize(m_rows * b.padded);
      if (!tiles) tiles.emplace();
      if (b.d == 64) return attend_block_amx<4>(w, b);
      return attend_block_amx<8>(w, b);
    }
  }
#endif
  w.qf.assign(b.m_count * b.dp, 0.f);
  for (int64_t m = 0; m < b.m_count; ++m) {
    for (int64_t i = 0; i < b.d; ++i) w.qf[m * b.dp + i] = static_cast<float>(queries[m][i]);
  }
  if (b.dp == 64) return attend_block<64 / W, T>(w, b);
  if (b.dp == 128) return attend_block<128 / W, T>(w, b);
  attend_block<0, T>(w, b);
}

template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& k_new, const torch::Tensor& v_new,
         const torch::Tensor& cache, const torch::Tensor& cu_q, const torch::Tensor& cu_ctx,
         const torch::Tensor& prefix, const torch::Tensor& vis, const torch::Tensor& cu_vis,
         const torch::Tensor& items, double scale, torch::Tensor& out) {
  const int64_t heads = q.size(1), d = q.size(2), dp = (d + W - 1) / W * W;
  const int64_t kv_heads = k_new.size(1), group = heads / kv_heads;
  const int64_t slots = cache.size(1);
  const T* qp = q.data_ptr<T>();
  const T* knp = k_new.data_ptr<T>();
  const T* vnp = v_new.data_ptr<T>();
  const int64_t q_row = q.stride(0), k_row = k_new.stride(0), v_row = v_new.stride(0);  // rows may be strided
  const T* kcp = cache.data_ptr<T>();
  const T* vcp = kcp + slots * kv_heads * d;
  T* op = out.data_ptr<T>();
  const int64_t* cq = cu_q.data_ptr<int64_t>();
  const int64_t* cc = cu_ctx.data_ptr<int64_t>();
  const int64_t* pre = prefix.data_ptr<int64_t>();
  const int64_t* work = items.data_ptr<int64_t>();  // [W, 2]: (sequence, first row of the block)
  const int64_t total = items.size(0) * kv_heads;
  std::atomic<int64_t> next{0};  // items go to whichever thread is free: a row's bits do not depend on it

  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), total), 1, [&](int64_t, int64_t) {
    Scratch w;
    std::vector<const T*> keys, values, queries;
    std::optional<TileScopeOrNone> tiles;  // AMX: set up by this thread's first AMX item, undone at its end
    for (int64_t item = next++; item < total; item = next++) {
      const int64_t s = work[2 * (item / kv_heads)], r0 = work[2 * (item / kv_heads) + 1], g = item % kv_heads;
      const int64_t n = cq[s + 1] - cq[s], ctx = cc[s + 1] - cc[s], len = ctx + n;
      const int64_t rows = std::min(ROW_BLOCK, n - r0);
      keys.resize(len);
      values.resize(len);
      for (int64_t j = 0; j < len; ++j) {  // the cached prefix in position order, then the new rows
        const bool cached = j < ctx;
        const int64_t at = cached ? (pre[cc[s] + j] * kv_heads + g) * d : 0;
        keys[j] = cached ? kcp + at : knp + (cq[s] + j - ctx) * k_row + g * d;
        values[j] = cached ? vcp + at : vnp + (cq[s] + j - ctx) * v_row + g * d;
      }
      queries.resize(rows * group);
      for (int64_t m = 0; m < rows * group; ++m) {  // query m: row r0 + m / group, head g * group + m % group
        queries[m] = qp + (cq[s] + r0 + m / group) * q_row + (g * group + m % group) * d;
      }
      Block<T> b{rows * group, group, len, ctx, n, d, dp, (len + W - 1) / W * W,
                 vis.data_ptr<uint8_t>() + cu_vis.data_ptr<int64_t>()[s] + r0 * n, keys.data(), values.data(),
                 static_cast<float>(scale),
                 [&](int64_t m) { return op + ((cq[s] + r0 + m / group) * heads + g * group + m % group) * d; }};
      w.kt.resize(d * TILE);
      w.s.resize(b.m_count * b.padded);
      w.acc.resize(b.m_count * dp);
      w.total.resize(b.m_count);
      attend_item<T>(w, b, queries.data(), tiles);
    }
  });
}

// ---- logit statistics: per row of the step's float32 logits, the two best tokens and log(sum(exp)) ----
// Best value and index per lane (a strict > keeps a lane's first index), then the lowest index among
// the lanes holding the maximum: the first index of a tie, as torch's argmax. The runner-up is the
// same search with the best index left out. lse = max + log(total), total = per-lane sums of
// exp_neg(x - max) in index order, then a fixed tree, then the tail in order: one row's numbers only.

inline std::pair<float, int64_t> best_of(const float* x, int64_t n, int64_t skip) {
  const float ninf = -std::numeric_limits<float>::infinity();
  vf m = vf{} + ninf;
  vi idx{}, lane;
  for (int64_t l = 0; l < W; ++l) lane[l] = static_cast<int32_t>(l);
  const int64_t vec_end = n - n % W;
  for (int64_t j = 0; j < vec_end; j += W) {
    const vi at = lane + static_cast<int32_t>(j);
    vf v = load(x + j);
    v = at == static_cast<int32_t>(skip) ? vf{} + ninf : v;
    const vi gt = v > m;
    m = gt ? v : m;
    idx = gt ? at : idx;
  }
  float best = reduce_max(m);
  int64_t where = -1;
  for (int64_t l = 0; l < W; ++l)
    if (m[l] == best && (where < 0 || idx[l] < where)) where = idx[l];
  if (where < 0 || (where == skip && best == ninf)) where = (skip == 0 && n > 1) ? 1 : 0;
  for (int64_t j = vec_end; j < n; ++j)
    if (j != skip && x[j] > best) best = x[j], where = j;
  return {best, where};
}

inline float log_sum_exp(const float* x, int64_t n, float m) {
  if (m == -std::numeric_limits<float>::infinity()) return m;
  vf total{};
  const int64_t vec_end = n - n % W;
  for (int64_t j = 0; j < vec_end; j += W) total += exp_neg(load(x + j) - m);
  float sum = reduce(total);
  for (int64_t j = vec_end; j < n; ++j) sum += std::exp(x[j] - m);
  return m + std::log(sum);
}

std::vector<torch::Tensor> logit_stats(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32, "logit_stats: float32 [R, V] logits");
  logits = logits.contiguous();
  const int64_t rows = logits.size(0), n = logits.size(1);
  TORCH_CHECK(n >= 2 && n < (int64_t{1} << 31), "logit_stats: vocabulary of 2 to 2^31 - 1 tokens");
  auto ids = torch::empty({rows, 2}, torch::kInt64);
  auto vals = torch::empty({rows, 2}, torch::kFloat32);
  auto lse = torch::empty({rows}, torch::kFloat32);
  const float* x = logits.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  float* vp = vals.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, rows, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* row = x + r * n;
      const auto first = best_of(row, n, -1);
      const auto second = best_of(row, n, first.second);
      ip[2 * r] = first.second, ip[2 * r + 1] = second.second;
      vp[2 * r] = first.first, vp[2 * r + 1] = second.first;
      lp[r] = log_sum_exp(row, n, first.first);
    }
  });
  return {ids, vals, lse};
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
  TORCH_CHECK(q.size(2) <= MAX_CHUNKS * W, "fused_attention: head dimension at most ", MAX_CHUNKS * W);
  TORCH_CHECK(items.scalar_type() == torch::kLong && cu_q.scalar_type() == torch::kLong && cu_ctx.scalar_type() == torch::kLong &&
                  prefix.scalar_type() == torch::kLong && cu_vis.scalar_type() == torch::kLong &&
                  vis.scalar_type() == torch::kByte,
              "fused_attention: index tensors must be int64 (visibility uint8)");
  for (torch::Tensor* t : {&q, &k_new, &v_new}) {  // rows may be strided views; heads and d contiguous
    if (t->stride(2) != 1 || t->stride(1) != t->size(2)) *t = t->contiguous();
  }
  auto out = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options());
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

// RMSNorm of each row of x [N, H], after adding y to x in place when y is given (x = T(x + y), as a
// torch add rounds): r = 1 / sqrt(sum(x^2) / H + eps) with the sum in 16-lane partial sums and a fixed
// tree, then out = T(w * T(x * r)), as the reference module rounds (docs/lossless.md).
template <typename T>
void rms_rows(T* x, const T* y, const T* w, T* out, int64_t rows, int64_t h, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(h);
    const int64_t whole = h / W * W;
    for (int64_t r = begin; r < end; ++r) {
      T* xr = x + r * h;
      if (y != nullptr) {  // x = T(x + y)
        const T* yr = y + r * h;
        for (int64_t i = 0; i < whole; i += W) store(xr + i, load(xr + i) + load(yr + i));
        for (int64_t i = whole; i < h; ++i) xr[i] = static_cast<T>(static_cast<float>(xr[i]) + static_cast<float>(yr[i]));
      }
      for (int64_t i = 0; i < whole; i += W) store(xf.data() + i, load(xr + i));
      for (int64_t i = whole; i < h; ++i) xf[i] = static_cast<float>(xr[i]);
      vf lane = {};
      for (int64_t i = 0; i < whole; i += W) {
        const vf v = load(xf.data() + i);
        lane = lane + v * v;
      }
      for (int64_t i = whole; i < h; ++i) lane[i - whole] = lane[i - whole] + xf[i] * xf[i];
      const float inv = 1.0f / std::sqrt(reduce(lane) / static_cast<float>(h) + eps);
      T* o = out + r * h;
      for (int64_t i = 0; i < whole; i += W) store(o + i, load(w + i) * rounded<T>(load(xf.data() + i) * inv));
      for (int64_t i = whole; i < h; ++i) {
        const float v = static_cast<float>(static_cast<T>(xf[i] * inv));
        o[i] = static_cast<T>(static_cast<float>(w[i]) * v);
      }
    }
  });
}

template <typename T>
void rms_typed(torch::Tensor& x, const c10::optional<torch::Tensor>& y, const torch::Tensor& weight,
               torch::Tensor& out, float eps) {
  rms_rows<T>(x.data_ptr<T>(), y.has_value() ? y->data_ptr<T>() : nullptr, weight.data_ptr<T>(), out.data_ptr<T>(),
              x.size(0), x.size(1), eps);
}

// rms_norm(x) or, with `residual`, x += residual (in place) then rms_norm(x).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps, c10::optional<torch::Tensor> residual) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && x.size(1) == weight.size(0), "rms_norm: x [N, H], weight [H]");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: x and weight must share a dtype");
  if (residual.has_value()) {
    TORCH_CHECK(x.is_contiguous(), "rms_norm: x must be contiguous to add the residual in place");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "rms_norm: residual must match x");
    residual = residual->contiguous();
  } else {
    x = x.contiguous();
  }
  weight = weight.contiguous();
  auto out = torch::empty_like(x);
  const float e = static_cast<float>(eps);
  switch (x.scalar_type()) {
    case torch::kFloat: rms_typed<float>(x, residual, weight, out, e); break;
    case torch::kBFloat16: rms_typed<c10::BFloat16>(x, residual, weight, out, e); break;
    case torch::kHalf: rms_typed<c10::Half>(x, residual, weight, out, e); break;
    default: TORCH_CHECK(false, "rms_norm: dtype must be float32, bfloat16 or float16");
  }
  return out;
}

// SwiGLU of x [N, 2I] = [gate | up]: out = T(T(silu(gate)) * up), each product in float32 and rounded
// once, as torch's silu then mul round. silu(g) = g * sigmoid(g), sigmoid from exp_neg(-|g|) per lane.
template <typename T>
inline vf silu(vf g) {
  const vf e = exp_neg(g < 0.f ? g : -g);  // exp(-|g|)
  const vf one = vf{} + 1.0f;
  return g * ((g < 0.f ? e : one) / (one + e));
}

template <typename T>
void swiglu_rows(const T* x, T* out, int64_t rows, int64_t inner) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    const int64_t whole = inner / W * W;
    for (int64_t r = begin; r < end; ++r) {
      const T* gr = x + r * 2 * inner;
      const T* ur = gr + inner;
      T* o = out + r * inner;
      for (int64_t i = 0; i < whole; i += W) store(o + i, rounded<T>(silu<T>(load(gr + i))) * load(ur + i));
      if (whole < inner) {
        float g[W] = {}, u[W] = {};
        for (int64_t i = whole; i < inner; ++i) {
          g[i - whole] = static_cast<float>(gr[i]);
          u[i - whole] = static_cast<float>(ur[i]);
        }
        store(g, rounded<T>(silu<T>(load(g))) * load(u));
        for (int64_t i = whole; i < inner; ++i) o[i] = static_cast<T>(g[i - whole]);
      }
    }
  });
}

torch::Tensor swiglu(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "swiglu: x [N, 2 * I]");
  x = x.contiguous();
  const auto n = x.size(0), inner = x.size(1) / 2;
  auto out = torch::empty({n, inner}, x.options());
  switch (x.scalar_type()) {
    case torch::kFloat: swiglu_rows<float>(x.data_ptr<float>(), out.data_ptr<float>(), n, inner); break;
    case torch::kBFloat16:
      swiglu_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), n, inner);
      break;
    case torch::kHalf: swiglu_rows<c10::Half>(x.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), n, inner); break;
    default: TORCH_CHECK(false, "swiglu: dtype must be float32, bfloat16 or float16");
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

// cache[0][slots[w]] = k[rows[w]], cache[1][slots[w]] = v[rows[w]]: the kept rows' K/V into their slots
// (k, v [N, kv_heads, d] with heads and d contiguous; rows may be strided). Bits are copied unchanged.
void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor cache, torch::Tensor rows, torch::Tensor slots) {
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && cache.dim() == 4 && cache.is_contiguous(), "store_kv: bad ranks");
  TORCH_CHECK(k.scalar_type() == cache.scalar_type() && v.scalar_type() == cache.scalar_type(), "store_kv: dtypes");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(1) == cache.size(2) && k.size(2) == cache.size(3),
              "store_kv: k, v [N, kv_heads, d] as the cache's slots");
  TORCH_CHECK(rows.scalar_type() == torch::kLong && slots.scalar_type() == torch::kLong && rows.numel() == slots.numel(),
              "store_kv: rows and slots int64, one slot per row");
  for (torch::Tensor* t : {&k, &v}) {
    if (t->stride(2) != 1 || t->stride(1) != t->size(2)) *t = t->contiguous();
  }
  rows = rows.contiguous();
  slots = slots.contiguous();
  const int64_t unit = cache.size(2) * cache.size(3) * cache.element_size(), num_slots = cache.size(1);
  const int64_t n = rows.numel(), kn = k.size(0);
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t w = 0; w < n; ++w) {
    TORCH_CHECK(r[w] >= 0 && r[w] < kn && sl[w] >= 0 && sl[w] < num_slots, "store_kv: row or slot out of range");
  }
  auto* kc = static_cast<char*>(cache.data_ptr());
  auto* vc = kc + num_slots * unit;
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  const int64_t k_row = k.stride(0) * k.element_size(), v_row = v.stride(0) * v.element_size();
  for (int64_t w = 0; w < n; ++w) {
    __builtin_memcpy(kc + sl[w] * unit, kp + r[w] * k_row, unit);
    __builtin_memcpy(vc + sl[w] * unit, vp + r[w] * v_row, unit);
  }
}

// A gated adapter's delta on the mask rows of one projection, in float32, added in place:
// y[row] += T(B (A x[row])) for each row in `rows`, where A is a [R, in] and B^T is bt [R, out]; B is
// block-diagonal, given by spans [S, 4] = (first column, end column, first output, end output) of each
// shard, so only its blocks are read and outputs outside them keep their bits. A and B are float32, or bf16
// when bf16 holds them exactly (widened in registers: the same float32 math, half the bytes; a step with
// mask rows streams every layer's A and B once, which is what it costs at a few rows).
constexpr int LORA_ROWS = 4;  // mask rows per pass over A and B: each weight vector is loaded once for all

// t[r][j0 + jj] = A[j0 + jj] . x[r] for jj < J: W-lane partial sums in index order, the tail into the first
// lanes, then the fixed tree (`reduce`): for each output the computation of one row and one j alone.
template <int R, int J, typename TW>
inline void lora_in(const TW* a, int64_t in, int64_t j0, const float* xf, float* t, int64_t r_total) {
  const int64_t whole = in / W * W;
  vf lane[J][R] = {};
  for (int64_t i = 0; i < whole; i += W) {
    vf av[J];
    for (int jj = 0; jj < J; ++jj) av[jj] = load(a + (j0 + jj) * in + i);
    for (int r = 0; r < R; ++r) {
      const vf xv = load(xf + r * in + i);
      for (int jj = 0; jj < J; ++jj) lane[jj][r] = fma(av[jj], xv, lane[jj][r]);
    }
  }
  for (int jj = 0; jj < J; ++jj) {
    const TW* aj = a + (j0 + jj) * in;
    for (int r = 0; r < R; ++r) {
      for (int64_t i = whole; i < in; ++i)
        lane[jj][r][i - whole] = std::fma(static_cast<float>(aj[i]), xf[r * in + i], lane[jj][r][i - whole]);
      t[r * r_total + j0 + jj] = reduce(lane[jj][r]);
    }
  }
}

// d[r][o .. o + V W) = sum over j in [j0, j1), in order, of t[r][j] * B^T[j][o ..] (one fma per term).
template <int R, int V, typename TW>
inline void lora_out(const float* t, int64_t r_total, const TW* bt, int64_t out, int64_t j0, int64_t j1, int64_t o,
                     float* d) {
  vf acc[R][V] = {};
  for (int64_t j = j0; j < j1; ++j) {
    vf bv[V];
    for (int v = 0; v < V; ++v) bv[v] = load(bt + j * out + o + v * W);
    for (int r = 0; r < R; ++r) {
      const vf tj = vf{} + t[r * r_total + j];
      for (int v = 0; v < V; ++v) acc[r][v] = fma(tj, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store(d + r * out + o + v * W, acc[r][v]);
}

constexpr int64_t LORA_OUT_TASK = 4 * W;  // outputs of B t per task (whole vectors first, the tail last)

// d = B t and y += T(d) for this shard's outputs [ob, oe): V vectors of outputs x R rows in registers.
template <int R, typename T, typename TW>
void lora_out_range(T* y, int64_t y_row, const int64_t* rows, const float* t, int64_t r_total, const TW* bt,
                    int64_t out, int64_t j0, int64_t j1, int64_t ob, int64_t oe, float* d) {
  int64_t o = ob;
  for (; o + 2 * W <= oe; o += 2 * W) lora_out<R, 2, TW>(t, r_total, bt, out, j0, j1, o, d);
  for (; o + W <= oe; o += W) lora_out<R, 1, TW>(t, r_total, bt, out, j0, j1, o, d);
  for (; o < oe; ++o)
    for (int r = 0; r < R; ++r) {
      float acc = 0.f;
      for (int64_t j = j0; j < j1; ++j) acc = std::fma(t[r * r_total + j], static_cast<float>(bt[j * out + o]), acc);
      d[r * out + o] = acc;
    }
  for (int r = 0; r < R; ++r) {
    T* yr = y + rows[r] * y_row;
    for (int64_t o = ob; o < oe; ++o)
      yr[o] = static_cast<T>(static_cast<float>(yr[o]) + static_cast<float>(static_cast<T>(d[r * out + o])));
  }
}

// R rows at a time: every output is the same float32 computation as for a row alone (A x: W-lane partial
// sums in index order, then the fixed tree; B t: one fma per rank index, in order), so blocking changes no bit.
// A step has a few mask rows, so the threads share A's rows, then B's outputs (not the mask rows: at 1-4 rows
// one thread streamed all of A and B); no output's computation depends on the split.
template <int R, typename T, typename TW>
void lora_block(T* y, int64_t y_row, const T* x, int64_t x_row, const int64_t* rows, const TW* a,
                const TW* bt, const int64_t* spans, int64_t num_spans, int64_t in, int64_t r_total, int64_t out,
                float* xf, float* t, float* d) {
  for (int r = 0; r < R; ++r) {
    const T* xr = x + rows[r] * x_row;
    for (int64_t i = 0; i < in; ++i) xf[r * in + i] = static_cast<float>(xr[i]);
  }
  at::parallel_for(0, (r_total + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {  // t = A x: 2 rows of A x R rows of x, each its own chain
      if (2 * p + 2 <= r_total) lora_in<R, 2, TW>(a, in, 2 * p, xf, t, r_total);
      else lora_in<R, 1, TW>(a, in, 2 * p, xf, t, r_total);
    }
  });
  std::vector<std::array<int64_t, 3>> tasks;  // (span, first output, end output)
  for (int64_t s = 0; s < num_spans; ++s)
    for (int64_t o = spans[4 * s + 2]; o < spans[4 * s + 3]; o += LORA_OUT_TASK)
      tasks.push_back({s, o, std::min(o + LORA_OUT_TASK, spans[4 * s + 3])});
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t s = tasks[k][0];
      lora_out_range<R, T, TW>(y, y_row, rows, t, r_total, bt, out, spans[4 * s], spans[4 * s + 1], tasks[k][1],
                               tasks[k][2], d);
    }
  });
}

template <typename T, typename TW>
void lora_rows(T* y, int64_t y_row, const T* x, int64_t x_row, const int64_t* rows, int64_t n, const TW* a,
               const TW* bt, const int64_t* spans, int64_t num_spans, int64_t in, int64_t r_total, int64_t out) {
  std::vector<float> xf(LORA_ROWS * in), t(LORA_ROWS * r_total), d(LORA_ROWS * out);
  for (int64_t w = 0; w < n; w += LORA_ROWS) {
    const auto call = [&](auto rows_here) {
      lora_block<decltype(rows_here)::value, T, TW>(y, y_row, x, x_row, rows + w, a, bt, spans, num_spans, in,
                                                    r_total, out, xf.data(), t.data(), d.data());
    };
    switch (std::min<int64_t>(LORA_ROWS, n - w)) {
      case 1: call(std::integral_constant<int, 1>{}); break;
      case 2: call(std::integral_constant<int, 2>{}); break;
      case 3: call(std::integral_constant<int, 3>{}); break;
      default: call(std::integral_constant<int, 4>{}); break;
    }
  }
}

// lora_delta_ for adapter weights of type TW (float32, or bf16 when it holds them exactly), by activation dtype.
template <typename TW>
void lora_typed(torch::Tensor& y, const torch::Tensor& x, const int64_t* rp, int64_t n, const TW* a, const TW* bt,
                const int64_t* sp, int64_t num_spans, int64_t r_total) {
  const int64_t in = x.size(1), out = y.size(1);
  switch (y.scalar_type()) {
    case torch::kFloat:
      lora_rows<float, TW>(y.data_ptr<float>(), y.stride(0), x.data_ptr<float>(), x.stride(0), rp, n, a, bt, sp,
                           num_spans, in, r_total, out);
      break;
    case torch::kBFloat16:
      lora_rows<c10::BFloat16, TW>(y.data_ptr<c10::BFloat16>(), y.stride(0), x.data_ptr<c10::BFloat16>(),
                                   x.stride(0), rp, n, a, bt, sp, num_spans, in, r_total, out);
      break;
    case torch::kHalf:
      lora_rows<c10::Half, TW>(y.data_ptr<c10::Half>(), y.stride(0), x.data_ptr<c10::Half>(), x.stride(0), rp, n, a,
                               bt, sp, num_spans, in, r_total, out);
      break;
    default:
      TORCH_CHECK(false, "lora_delta_: dtype must be float32, bfloat16 or float16");
  }
}

void lora_delta_(torch::Tensor y, torch::Tensor x, torch::Tensor rows, torch::Tensor a, torch::Tensor bt,
                 torch::Tensor spans) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && y.stride(1) == 1 && x.stride(1) == 1, "lora_delta_: y, x [N, *] rows");
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "lora_delta_: y and x must share a dtype");
  TORCH_CHECK((a.scalar_type() == torch::kFloat || a.scalar_type() == torch::kBFloat16) &&
                  bt.scalar_type() == a.scalar_type() && a.is_contiguous() && bt.is_contiguous() &&
                  a.size(1) == x.size(1) && bt.size(0) == a.size(0) && bt.size(1) == y.size(1),
              "lora_delta_: a [R, in] and bt [R, out], both float32 or both bf16");
  TORCH_CHECK(spans.scalar_type() == torch::kLong && spans.dim() == 2 && spans.size(1) == 4 && spans.is_contiguous(),
              "lora_delta_: spans [S, 4] int64");
  TORCH_CHECK(rows.scalar_type() == torch::kLong, "lora_delta_: rows int64");
  rows = rows.contiguous();
  const int64_t n = rows.numel(), r_total = a.size(0), out = y.size(1);
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t w = 0; w < n; ++w) TORCH_CHECK(rp[w] >= 0 && rp[w] < y.size(0) && rp[w] < x.size(0), "lora_delta_: row out of range");
  const int64_t* sp = spans.data_ptr<int64_t>();
  for (int64_t s = 0; s < spans.size(0); ++s) {
    TORCH_CHECK(0 <= sp[4 * s] && sp[4 * s] <= sp[4 * s + 1] && sp[4 * s + 1] <= r_total && 0 <= sp[4 * s + 2] &&
                    sp[4 * s + 2] <= sp[4 * s + 3] && sp[4 * s + 3] <= out,
                "lora_delta_: span out of range");
  }
  if (a.scalar_type() == torch::kBFloat16) {
    lora_typed(y, x, rp, n, a.data_ptr<c10::BFloat16>(), bt.data_ptr<c10::BFloat16>(), sp, spans.size(0), r_total);
  } else {
    lora_typed(y, x, rp, n, a.data_ptr<float>(), bt.data_ptr<float>(), sp, spans.size(0), r_total);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_attention", &fused_attention, "Fused batch-invariant attention (CPU)");
  m.def("rms_norm", &rms_norm, "Row-wise RMSNorm, after an in-place residual add when one is given (CPU)",
        py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("residual") = py::none());
  m.def("lora_delta_", &lora_delta_, "A gated adapter's delta added on the mask rows, in place (CPU)");
  m.def("store_kv", &store_kv, "Kept rows' K/V into their cache slots (CPU)");
  m.def("swiglu", &swiglu, "silu(gate) * up of [gate | up] rows (CPU)");
  m.def("rotary", &rotary, "Rotary embedding, halves layout (CPU)");
  m.def("logit_stats", &logit_stats, "Per row of float32 logits: the two best (ids, values) and logsumexp (CPU)");
}
