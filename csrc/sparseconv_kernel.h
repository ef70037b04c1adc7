// The SparseConv compute kernels, written once and compiled per ISA.
//
// A translation unit defines SPARSIFY_ISA_NS (namespace), SPARSIFY_ISA_NAME (string),
// SPARSIFY_VBYTES (vector width in bytes) and SPARSIFY_ENTRY (entry-point name), then includes
// this file. Everything here has internal linkage (anonymous namespace) so the per-ISA copies
// never meet at link time.
//
// Algorithm (Changpinyo et al. 2017, appendix, Algorithm 2): for every output channel o and every
// live connection (o, i) with kernel w, out[o] += conv(pad(in[i]), w). Register blocks of output
// vectors keep their accumulators in registers across all live connections of the channel, each
// loaded input vector feeds every vertical tap that needs it, and the kxk weights of a connection
// are broadcast once per block. Paths, fastest first:
//  - kSmall3 (AVX-512): 3x3 'same' conv on planes of <= 4 vectors (8x8, 4x4): the plane is loaded
//    from X into registers; shifted planes are lane rotations and masked loads; no padded copy.
//  - kFlat3: 3x3 stride 1: wide rows padded to whole vectors in one copy (AVX-512 'same' convs:
//    unshifted aligned rows, kx taps by lane rotation), narrow rows packed several per vector.
//  - kDepthwise (AVX-512 units): 3x3 / 5x5, stride 1 or 2, one input channel per output: masked
//    loads straight from X (no padded copy), four output rows per pass.
//  - kDirect: 1x1 / 3x3 / 5x5 / 7x7, stride 1 or 2, over a zero-padded copy (stride 2 split into
//    even/odd column phases so that every tap reads contiguous memory; on the AVX-512 units the
//    kx taps are lane rotations of each phase's row). 3x3/s2 and 7x7/s2: runs of kFanInBlock output
//    channels with the same input channels (block sparsity; a stem's channels, which the op glue
//    regroups by fan-in) go through together (compute_block).
//  - kPointwise: 1x1 without pads (strided ones over a subsampled input): tiles of pixels whose
//    input rows stay in L2 while every output channel streams its connections over them (an
//    SpMM bound by the L2 bandwidth: each connection reads its input row once per tile; runs of
//    kFanInBlock channels with the same input channels share each load, four FMAs per vector;
//    with their weights interleaved, the 1-4 pixels a plane leaves over whole vectors ride
//    across the block in one 4-float FMA per connection, pw_block_tail). kxk convs with such
//    blocks to planes of a few vectors and a few pixels (7x7) run as this 1x1 unit over the
//    input's shifted copies (im2col; chosen by the op glue).
//  - kGeneric: anything else.
// Padded paths walk strips of output rows over all output channels; planes whose padded copy
// exceeds the cache budget pad strip by strip (the op glue, sparseconv_op.cc).
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "sparseconv_common.h"

namespace sparsify_conv {
namespace SPARSIFY_ISA_NS {
namespace {

constexpr int VL = SPARSIFY_VBYTES / 4;  // floats per vector
typedef float vf __attribute__((vector_size(SPARSIFY_VBYTES)));
typedef float vfu __attribute__((vector_size(SPARSIFY_VBYTES), aligned(4), may_alias));

inline vf loadu(const float* p) { return *reinterpret_cast<const vfu*>(p); }
// Loads an input vector into a register once. Without the empty asm the compiler folds the load
// into each FMA that uses it (one unaligned, usually line-crossing load per FMA instead of one
// per vertical tap group), which halves throughput.
inline vf load_once(const float* p) {
  vf v = loadu(p);
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  asm("" : "+v"(v));
#endif
  return v;
}
// Hides how a pointer was computed, so the compiler addresses every load as this register plus
// an immediate instead of keeping dozens of precomputed index offsets on the stack.
inline void launder(const float*& p) {
#if defined(__GNUC__) || defined(__clang__)
  asm("" : "+r"(p));
#endif
}
inline void storeu(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
// Masked loads and stores of lanes m (bit i: lane i) on the AVX-512 units, 16- or 8-float
// (AVX512VL) vectors: masked-off lanes are neither read nor written (loads give 0 there).
#if defined(__AVX512F__) && (SPARSIFY_VBYTES == 64 || (SPARSIFY_VBYTES == 32 && defined(__AVX512VL__)))
#define SPARSIFY_MASKED 1
inline vf load_mask(const float* p, uint32_t m) {
#if SPARSIFY_VBYTES == 64
  return vf(_mm512_maskz_loadu_ps(__mmask16(m), p));
#else
  return vf(_mm256_maskz_loadu_ps(__mmask8(m), p));
#endif
}
inline void store_mask(float* p, vf v, uint32_t m) {
#if SPARSIFY_VBYTES == 64
  _mm512_mask_storeu_ps(p, __mmask16(m), __m512(v));
#else
  _mm256_mask_storeu_ps(p, __mmask8(m), __m256(v));
#endif
}
// Lanes m .. VL - 1 of cur followed by lanes 0 .. m - 1 of next (valignd).
template <int M>
inline vf rotate_impl(vf next, vf cur) {
#if SPARSIFY_VBYTES == 64
  return vf(_mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(__m512(next)), _mm512_castps_si512(__m512(cur)), M)));
#else
  return vf(_mm256_castsi256_ps(_mm256_alignr_epi32(_mm256_castps_si256(__m256(next)), _mm256_castps_si256(__m256(cur)), M)));
#endif
}
// m in 1 .. 3 (a constant once the callers' loops are unrolled).
__attribute__((always_inline)) inline vf rotate(vf next, vf cur, int m) {
  return m == 1 ? rotate_impl<1>(next, cur) : m == 2 ? rotate_impl<2>(next, cur) : rotate_impl<3>(next, cur);
}
// The lanes i of a vector whose column first + i lies in [0, n): the mask of a row's load at
// column first that reads nothing outside the row.
inline uint32_t lanes_in(int64_t first, int64_t n) {
  const int64_t a = first < 0 ? -first : 0, b = n - first < VL ? n - first : VL;
  if (b <= a) return 0;
  return ((1u << b) - 1u) & ~((1u << a) - 1u);
}
#else
#define SPARSIFY_MASKED 0
#endif
// Stores the first n (< VL) lanes: a masked store where the ISA has one (a libc memcpy per
// partial row was a fifth of a 28x28 layer's time).
inline void store_first(float* p, vf v, int64_t n) {
#if SPARSIFY_MASKED
  store_mask(p, v, (1u << n) - 1u);
#else
  float tmp[VL];
  storeu(tmp, v);
  for (int64_t i = 0; i < n; ++i) p[i] = tmp[i];
#endif
}
// x - 0 is exactly x (also for -0), so this folds to one broadcast instruction.
inline vf bcast(float x) { return x - vf{}; }
typedef int32_t vi __attribute__((vector_size(SPARSIFY_VBYTES)));
// Lane indices 0, 2, 4, ... over a pair of vectors (+ 1: the odd lanes).
const vi kEven = [] {
  vi v;
  for (int i = 0; i < VL; ++i) v[i] = 2 * i;
  return v;
}();
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// Calls one(set, k) for the connections k in [0, cnt): SETS independent accumulator sets take
// consecutive connections in turn (more FMA chains in flight than one set allows), the rest go
// to set 0.
template <int SETS, class F>
__attribute__((always_inline)) inline void over_connections(int64_t cnt, F&& one) {
  int64_t k = 0;
  for (; k + SETS <= cnt; k += SETS) {
#pragma GCC unroll 16
    for (int s = 0; s < SETS; ++s) one(s, k + s);
  }
  for (; k < cnt; ++k) one(0, k);
}

// ---------------------------------------------------------------------------------------------
// Direct path: square K in {1,3,5,7}, stride S in {1,2}, dilation 1.

typedef void (*PlaneFn)(const Geom& g, const Plan& p, const float* xp_n, float* y,
                        const float* w_row, const int64_t* cols, int64_t cnt, float bias,
                        int64_t cin_base, int64_t row0, int64_t row1);

// Output rows [row0, row1) (row0 a multiple of R). When a row takes several register blocks,
// connections are processed in chunks whose input windows for one strip of R output rows fit in
// L1; between chunks the strip's partial sums wait in a small stack buffer.
constexpr int64_t kL1Budget = 24 * 1024;
constexpr int64_t kStripFloats = 8192;

// B output channels at once (B > 1: channels that read the same input channels, cols; y[b], w_rows[b],
// bias[b] are channel b's): every loaded input vector feeds B channels' FMAs.
template <int K, int S, int R, int V, int B>
void direct_core(const Geom& g, const Plan& p, const float* __restrict xp_n, float* const* ys,
                 const float* const* w_rows, const int64_t* __restrict cols, int64_t cnt,
                 const float* bias, int64_t cin_base, int64_t row0, int64_t row1) {
  constexpr int KK = K * K;
  constexpr int ROWS = S * (R - 1) + K;  // input rows touched by R output rows
  const int64_t Ho = g.Ho, Wo = g.Wo, Wps = p.Wps, plane = p.plane, phase = p.phase;
  const int64_t wo_round = cdiv(cdiv(Wo, VL), V) * V * VL;
  int64_t ck = kL1Budget / (ROWS * Wps * S * int64_t(sizeof(float)));
  if (ck < 4) ck = 4;
  // Blocks of channels keep no partial sums: all connections in one pass.
  if (B > 1 || ck >= cnt || R * wo_round > kStripFloats || wo_round <= V * VL) ck = cnt > 0 ? cnt : 1;
  alignas(64) float strip[B == 1 ? kStripFloats : 1];
  for (int64_t y0 = row0; y0 < row1; y0 += R) {
    const float* blk_row = xp_n + S * y0 * Wps;
    for (int64_t c0 = 0; c0 < cnt || c0 == 0; c0 += ck) {
      const int64_t c1 = c0 + ck < cnt ? c0 + ck : cnt;
      const bool first = c0 == 0, last = c1 >= cnt;
      for (int64_t x0 = 0; x0 < Wo; x0 += V * VL) {
        vf acc[B][R][V];
#pragma GCC unroll 16
        for (int b = 0; b < B; ++b)
#pragma GCC unroll 16
          for (int j = 0; j < R; ++j)
#pragma GCC unroll 16
            for (int v = 0; v < V; ++v)
              acc[b][j][v] = first ? bcast(bias[b]) : loadu(strip + j * wo_round + x0 + v * VL);
        const float* blk = blk_row + x0;
        // Output lanes of this block that read beyond its last vector (stride-2 rotations).
        const bool next = x0 + V * VL - (K - 1) / 2 < Wo;
        (void)next;
        for (int64_t k = c0; k < c1; ++k) {
          const float* base = blk + (cin_base + cols[k]) * plane;
          // K = 3, one channel: the nine weights stay broadcast in registers. Larger kernels
          // and blocks of channels have too many for the register file: each FMA broadcasts its
          // weight from memory (an embedded-broadcast operand) instead of reloading a spilled
          // 64-byte copy.
          constexpr bool kRegW = K <= 3 && B == 1;
          vf wv[kRegW ? KK : 1];
          if constexpr (kRegW) {
#pragma GCC unroll 64
            for (int t = 0; t < KK; ++t) wv[t] = bcast(w_rows[0][k * KK + t]);
          }
          const float* wk[B];
#pragma GCC unroll 8
          for (int b = 0; b < B; ++b) wk[b] = w_rows[b] + k * KK;
          auto wt = [&](int b, int t) __attribute__((always_inline)) {
            if constexpr (kRegW) return wv[t];
            else return bcast(wk[b][t]);
          };
          const float* row = base;
#if SPARSIFY_MASKED
          if constexpr (S == 2) {
            // Stride 2 on the AVX-512 units: tap kx reads phase kx % 2 at column offset kx / 2,
            // which is the phase's vectors rotated by kx / 2 lanes (valignd with the next vector):
            // two loads per row and vector instead of K, most of them aligned with no line split.
            // The next vector is needed only when a valid output lane reads past the block.
            constexpr int M = (K - 1) / 2;  // largest offset (even phase; the odd one's is M - 1)
            const uint32_t mnext = (1u << (M > 0 ? M : 1)) - 1u;
#pragma GCC unroll 64
            for (int rr = 0; rr < ROWS; ++rr, row += Wps) {
              if constexpr (!kRegW) {
#pragma GCC unroll 8
                for (int b = 0; b < B; ++b) launder(wk[b]);
              }
              vf ph[2][V + 1];
#pragma GCC unroll 2
              for (int q = 0; q < 2; ++q) {
                const float* src = row + q * phase;
#pragma GCC unroll 16
                for (int v = 0; v < V; ++v) ph[q][v] = load_once(src + v * VL);
                ph[q][V] = (M - q > 0 && next) ? load_mask(src + V * VL, mnext) : vf{};
              }
#pragma GCC unroll 16
              for (int kx = 0; kx < K; ++kx) {
                const int q = kx % 2, m = kx / 2;
#pragma GCC unroll 16
                for (int v = 0; v < V; ++v) {
                  const vf in = m == 0 ? ph[q][v] : rotate(ph[q][v + 1], ph[q][v], m);
#pragma GCC unroll 16
                  for (int j = 0; j < R; ++j) {
                    const int ky = rr - S * j;
#pragma GCC unroll 8
                    for (int b = 0; b < B; ++b)
                      if (ky >= 0 && ky < K) acc[b][j][v] += wt(b, ky * K + kx) * in;
                  }
                }
              }
            }
            continue;
          }
#endif
#pragma GCC unroll 64
          for (int rr = 0; rr < ROWS; ++rr, row += Wps) {
            if constexpr (!kRegW) {
#pragma GCC unroll 8
              for (int b = 0; b < B; ++b) launder(wk[b]);
            }
#pragma GCC unroll 16
            for (int kx = 0; kx < K; ++kx) {
              const float* src = row + (kx % S) * phase + kx / S;
#pragma GCC unroll 16
              for (int v = 0; v < V; ++v) {
                const vf in = load_once(src + v * VL);
#pragma GCC unroll 16
                for (int j = 0; j < R; ++j) {
                  const int ky = rr - S * j;
#pragma GCC unroll 8
                  for (int b = 0; b < B; ++b)
                    if (ky >= 0 && ky < K) acc[b][j][v] += wt(b, ky * K + kx) * in;
                }
              }
            }
          }
        }
        if (!last) {  // B == 1 only
#pragma GCC unroll 16
          for (int j = 0; j < R; ++j)
#pragma GCC unroll 16
            for (int v = 0; v < V; ++v) storeu(strip + j * wo_round + x0 + v * VL, acc[0][j][v]);
          continue;
        }
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b)
#pragma GCC unroll 16
          for (int j = 0; j < R; ++j) {
            if (y0 + j >= Ho) break;
            float* out = ys[b] + (y0 + j) * Wo;
#pragma GCC unroll 16
            for (int v = 0; v < V; ++v) {
              const int64_t xs = x0 + v * VL;
              if (xs + VL <= Wo) {
                storeu(out + xs, acc[b][j][v]);
              } else if (xs < Wo) {
                store_first(out + xs, acc[b][j][v], Wo - xs);
              }
            }
          }
      }
    }
  }
}

template <int K, int S, int R, int V>
void direct_plane(const Geom& g, const Plan& p, const float* __restrict xp_n, float* __restrict y,
                  const float* __restrict w_row, const int64_t* __restrict cols, int64_t cnt,
                  float bias, int64_t cin_base, int64_t row0, int64_t row1) {
  float* ys[1] = {y};
  const float* ws[1] = {w_row};
  direct_core<K, S, R, V, 1>(g, p, xp_n, ys, ws, cols, cnt, &bias, cin_base, row0, row1);
}

// kFanInBlock output channels sharing cols (the kDirect path's block unit).
typedef void (*BlockFn)(const Geom& g, const Plan& p, const float* xp_n, float* const* ys,
                        const float* const* w_rows, const int64_t* cols, int64_t cnt, const float* bias,
                        int64_t cin_base, int64_t row0, int64_t row1);
struct BlockCfg {
  int K, S, R, V;
  BlockFn fn;
};
#define SPARSIFY_BCFG(K, R, V) \
  { K, 2, R, V, &direct_core<K, 2, R, V, kFanInBlock> }
// Stride 2 only: 3x3 (stride-1 3x3 convs run on kFlat3) and 7x7 (stems); each instantiation adds
// seconds of build time. kFanInBlock x R x V accumulators: at most 16 of 32 registers, 8 of 16.
const BlockCfg kBlockCfgs[] = {
    SPARSIFY_BCFG(3, 1, 1), SPARSIFY_BCFG(3, 2, 1), SPARSIFY_BCFG(3, 1, 2),
    SPARSIFY_BCFG(7, 1, 1), SPARSIFY_BCFG(7, 2, 1), SPARSIFY_BCFG(7, 1, 2),
#if SPARSIFY_NREGS >= 32
    SPARSIFY_BCFG(3, 2, 2), SPARSIFY_BCFG(7, 2, 2),
#endif
};
#undef SPARSIFY_BCFG
constexpr int kNumBlockCfgs = sizeof(kBlockCfgs) / sizeof(kBlockCfgs[0]);

// The block unit for a kDirect plan of register block R x V: the most accumulators whose rows and
// vectors divide R and V (it then walks the same padded layout and strips); -1 if none.
int pick_block_cfg(int K, int S, int R, int V) {
  int best = -1;
  for (int i = 0; i < kNumBlockCfgs; ++i) {
    const BlockCfg& c = kBlockCfgs[i];
    if (c.K != K || c.S != S || R % c.R != 0 || V % c.V != 0) continue;
    if (best < 0 || c.R * c.V > kBlockCfgs[best].R * kBlockCfgs[best].V) best = i;
  }
  return best;
}

struct Cfg {
  int K, S, R, V;
  PlaneFn fn;
};

#define SPARSIFY_CFG(K, R, V) \
  {K, 1, R, V, &direct_plane<K, 1, R, V>}, { K, 2, R, V, &direct_plane<K, 2, R, V> }

// Register blocks per kernel size. Each accumulator is a chain of dependent FMAs, so a block
// needs about 8 of them to keep two FMA pipes busy. K=3 keeps its 9 weights in registers: with
// 16 registers that leaves room for 6 accumulators, with 32 (AVX-512) for 8 (larger blocks made
// GCC spill accumulators). Larger kernels stream their weights from L1.
const Cfg kCfgs[] = {
#if SPARSIFY_NREGS >= 32
    SPARSIFY_CFG(1, 1, 1), SPARSIFY_CFG(1, 4, 1), SPARSIFY_CFG(1, 4, 2), SPARSIFY_CFG(1, 2, 4),
    SPARSIFY_CFG(3, 1, 1), SPARSIFY_CFG(3, 2, 1), SPARSIFY_CFG(3, 4, 1), SPARSIFY_CFG(3, 6, 1),
    SPARSIFY_CFG(3, 8, 1), SPARSIFY_CFG(3, 2, 2), SPARSIFY_CFG(3, 4, 2), SPARSIFY_CFG(3, 2, 4),
    SPARSIFY_CFG(5, 1, 1), SPARSIFY_CFG(5, 2, 1), SPARSIFY_CFG(5, 4, 1), SPARSIFY_CFG(5, 2, 2),
    SPARSIFY_CFG(5, 4, 2), SPARSIFY_CFG(5, 8, 1),
    SPARSIFY_CFG(7, 1, 1), SPARSIFY_CFG(7, 2, 1), SPARSIFY_CFG(7, 4, 1), SPARSIFY_CFG(7, 2, 2),
    SPARSIFY_CFG(7, 4, 2), SPARSIFY_CFG(7, 8, 1),
#else
    SPARSIFY_CFG(1, 1, 1), SPARSIFY_CFG(1, 2, 1), SPARSIFY_CFG(1, 4, 1), SPARSIFY_CFG(1, 2, 2),
    SPARSIFY_CFG(1, 4, 2),
    SPARSIFY_CFG(3, 1, 1), SPARSIFY_CFG(3, 2, 1), SPARSIFY_CFG(3, 3, 1), SPARSIFY_CFG(3, 4, 1),
    SPARSIFY_CFG(3, 5, 1), SPARSIFY_CFG(3, 2, 2), SPARSIFY_CFG(3, 3, 2),
    SPARSIFY_CFG(5, 1, 1), SPARSIFY_CFG(5, 2, 1), SPARSIFY_CFG(5, 4, 1), SPARSIFY_CFG(5, 2, 2),
    SPARSIFY_CFG(7, 1, 1), SPARSIFY_CFG(7, 2, 1), SPARSIFY_CFG(7, 4, 1), SPARSIFY_CFG(7, 2, 2),
#endif
};
#undef SPARSIFY_CFG
constexpr int kNumCfgs = sizeof(kCfgs) / sizeof(kCfgs[0]);

// Pick the register block with the lowest modelled cost (FMAs incl. wasted edge work, loads and
// weight broadcasts at half an FMA each, a little loop overhead per block).
int pick_cfg(int K, int S, int64_t Ho, int64_t Wo) {
  const int64_t nv = cdiv(Wo, VL);
  int best = -1;
  double best_cost = 0.0;
  for (int i = 0; i < kNumCfgs; ++i) {
    const Cfg& c = kCfgs[i];
    if (c.K != K || c.S != S) continue;
    // Cycles per block and connection: two FMAs per cycle, but no faster than one chain of K*K
    // dependent FMAs (4 cycles each) allows; loads mostly cross cache lines (~1 per cycle).
    const double blocks = double(cdiv(Ho, c.R)) * double(cdiv(nv, c.V));
    const double fma = double(c.R) * c.V * K * K;
    // Stride 2 on the AVX-512 units loads each phase's row once (lane rotations make the kx taps).
    const double loads = double(S * (c.R - 1) + K) * (S == 2 && SPARSIFY_MASKED ? 2 : K) * c.V;
    double cycles = fma / 2 > 4.0 * K * K ? fma / 2 : 4.0 * K * K;
    if (loads > cycles) cycles = loads;
    const double cost = blocks * (cycles + 4.0);
    if (best < 0 || cost < best_cost) {
      best = i;
      best_cost = cost;
    }
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// Flat path: 3x3, stride 1, dilation 1 (the common case). The output plane is a sequence of
// vectors: for planes at least one vector wide, each output row is padded to ws = a multiple of
// VL and read from ONE zero-padded input copy at column offsets kx (rows of in_row >= ws + 2
// floats); for narrow planes (ws divides VL) one vector holds P = VL / ws consecutive output rows
// and the input is repacked into THREE copies shifted by kx = 0, 1, 2 whose rows are exactly ws
// wide, so a whole 8x8 or 4x4 plane is 4 or 1 full vectors with no wasted lanes. A block of RB
// vectors (x NV columns) keeps its accumulators in registers over all live connections; every
// loaded input vector feeds each vertical tap that needs it; NSET accumulator sets take
// alternate connections so there are enough independent FMA chains on small blocks.

// One live connection into one accumulator set. base points at the block's first input row of
// the connection's channel. Narrow planes (P > 1) read three kx-shifted copies kxs floats apart
// with rows of VL / P floats; wide planes (P == 1) read one padded copy at offsets kx with rows
// `stride` floats apart, a compile-time NV * VL + 2 when the block spans the whole row (FULL).
// Tap t goes to accumulator split t % NS: NS independent chains per output vector.
template <int P, int NV, int RB, int NS, bool FULL, bool ALIGN>
__attribute__((always_inline)) inline void flat3_step(vf (&a)[NS][RB][NV], const float* __restrict base,
                                                      const float* __restrict w, int64_t stride,
                                                      int64_t kxs) {
  constexpr int NR = (RB - 1) * P + 3;  // input rows touched per block
  constexpr int64_t CSTRIDE = P > 1 ? VL / P : ALIGN ? NV * VL : NV * VL + 2;
  const int64_t rs = (P > 1 || FULL) ? CSTRIDE : stride;
  vf wv[9];
#pragma GCC unroll 9
  for (int t = 0; t < 9; ++t) wv[t] = bcast(w[t]);
#if SPARSIFY_VBYTES == 64 && defined(__AVX512F__)
  if constexpr (ALIGN) {
    // Rows of exactly NV aligned vectors (a 'same' conv's unshifted input): the kx = 0 and 2
    // taps are the row shifted by one lane, built with valignd from the neighbouring vector
    // (zero beyond the row ends, which is the left / right padding).
    const float* row = base;
    launder(row);
    const __m512i zero = _mm512_setzero_si512();
#pragma GCC unroll 64
    for (int rr = 0; rr < NR; ++rr) {
      __m512i c[NV];
#pragma GCC unroll 16
      for (int u = 0; u < NV; ++u) c[u] = _mm512_castps_si512(load_once(row + rr * rs + u * VL));
#pragma GCC unroll 3
      for (int q = 0; q < 3; ++q) {
        const int kx = q == 0 ? 1 : q == 1 ? 0 : 2;
#pragma GCC unroll 16
        for (int u = 0; u < NV; ++u) {
          vf in;
          if (kx == 1) in = vf(_mm512_castsi512_ps(c[u]));
          else if (kx == 0) in = vf(_mm512_castsi512_ps(_mm512_alignr_epi32(c[u], u > 0 ? c[u - 1] : zero, 15)));
          else in = vf(_mm512_castsi512_ps(_mm512_alignr_epi32(u + 1 < NV ? c[u + 1] : zero, c[u], 1)));
#pragma GCC unroll 16
          for (int j = 0; j < RB; ++j) {
            const int ky = rr - j * P;
            if (ky >= 0 && ky < 3) a[(ky * 3 + kx) % NS][j][u] += wv[ky * 3 + kx] * in;
          }
        }
      }
    }
    return;
  }
#endif
#pragma GCC unroll 3
  for (int kx = 0; kx < 3; ++kx) {
    const float* row = P > 1 ? base + kx * kxs : base + kx;
    launder(row);
#pragma GCC unroll 64
    for (int rr = 0; rr < NR; ++rr) {
#pragma GCC unroll 16
      for (int u = 0; u < NV; ++u) {
        const vf in = load_once(row + rr * rs + u * VL);
#pragma GCC unroll 16
        for (int j = 0; j < RB; ++j) {
          const int ky = rr - j * P;
          if (ky >= 0 && ky < 3) a[(ky * 3 + kx) % NS][j][u] += wv[ky * 3 + kx] * in;
        }
      }
    }
  }
}

// Output rows [row0, row1) of one output channel over `cnt` connections; NC accumulator sets
// take alternate connections (more independent chains for one-vector planes).
template <int P, int NV, int RB, int NS, int NC, bool FULL, bool ALIGN = false>
void flat3_rows(const Geom& g, const Plan& p, const float* __restrict xp_n, float* __restrict y,
                const float* __restrict w_row, const int64_t* __restrict cols, int64_t cnt,
                float bias, int64_t cin_base, int64_t row0, int64_t row1) {
  const int64_t in_row = p.Wps, kxs = P > 1 ? p.kxs : 1, plane = p.plane, Wo = g.Wo, Ho = g.Ho;
  const int64_t ws = p.ws, nvr = p.nvr;
  const float* xg = xp_n + cin_base * plane;
  for (int64_t yb = row0; yb < row1; yb += RB * P) {
    for (int64_t cv = 0; cv < nvr; cv += NV) {
      vf acc[NC][NS][RB][NV];
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c)
#pragma GCC unroll 16
        for (int s = 0; s < NS; ++s)
#pragma GCC unroll 16
          for (int j = 0; j < RB; ++j)
#pragma GCC unroll 16
            for (int u = 0; u < NV; ++u) acc[c][s][j][u] = (c == 0 && s == 0) ? bcast(bias) : vf{};
      const float* blk = xg + yb * in_row + cv * VL;
      over_connections<NC>(cnt, [&](int c, int64_t k) __attribute__((always_inline)) {
        flat3_step<P, NV, RB, NS, FULL, ALIGN>(acc[c], blk + cols[k] * plane, w_row + k * 9, in_row, kxs);
      });
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c)
#pragma GCC unroll 16
        for (int s = 0; s < NS; ++s) {
          if (c == 0 && s == 0) continue;
#pragma GCC unroll 16
          for (int j = 0; j < RB; ++j)
#pragma GCC unroll 16
            for (int u = 0; u < NV; ++u) acc[0][0][j][u] += acc[c][s][j][u];
        }
#pragma GCC unroll 16
      for (int j = 0; j < RB; ++j) {
        const int64_t r = yb + j * P;  // first output row of this vector
        if (r >= Ho) break;
#pragma GCC unroll 16
        for (int u = 0; u < NV; ++u) {
          const vf v = acc[0][0][j][u];
          if (P == 1) {
            const int64_t xs = (cv + u) * VL;
            float* out = y + r * Wo + xs;
            if (xs + VL <= Wo) {
              storeu(out, v);
            } else if (xs < Wo) {
              store_first(out, v, Wo - xs);
            }
          } else if (ws == Wo && r + P <= Ho) {
            storeu(y + r * Wo, v);
          } else {
            float tmp[VL];
            storeu(tmp, v);
            for (int q = 0; q < P && r + q < Ho; ++q)
              std::memcpy(y + (r + q) * Wo, tmp + q * ws, sizeof(float) * Wo);
          }
        }
      }
    }
  }
}

constexpr bool kAlignShifts = SPARSIFY_VBYTES == 64;

typedef void (*RowsFn)(const Geom& g, const Plan& p, const float* xp_n, float* y,
                       const float* w_row, const int64_t* cols, int64_t cnt, float bias,
                       int64_t cin_base, int64_t row0, int64_t row1);

struct FlatCfg {
  int P, NV, RB, NS, NC;
  bool full;
  RowsFn fn, fn_align;  // fn_align: FULL wide-plane 'same' convs on AVX-512 (valignd shifts)
};

#define SPARSIFY_FLAT(P, NV, RB, NS, NC, FULL)                                                   \
  {                                                                                              \
    P, NV, RB, NS, NC, FULL, &flat3_rows<P, NV, RB, NS, NC, FULL>,                               \
        (kAlignShifts && P == 1 && FULL) ? &flat3_rows<P, NV, RB, NS, NC, FULL, true> : nullptr \
  }
// Accumulators RB*NV*NS*NC plus 9 broadcast weights plus an input vector or two must fit the
// register file; each accumulator is a chain of dependent FMAs, so a config needs about 8
// accumulators in flight (NS tap splits, NC sets over alternate connections for small blocks).
// FULL configs serve planes whose rows are exactly NV vectors (compile-time row stride).
const FlatCfg kFlatCfgs[] = {
#if SPARSIFY_NREGS >= 32
    SPARSIFY_FLAT(1, 1, 8, 2, 1, true), SPARSIFY_FLAT(1, 1, 16, 1, 1, true),
    // 14-row planes (14x14: one 16-float vector per row) in whole blocks: 8- and 16-row blocks
    // left 2 of every 16 row slots idle.
    SPARSIFY_FLAT(1, 1, 14, 1, 1, true), SPARSIFY_FLAT(1, 1, 7, 2, 1, true),
    SPARSIFY_FLAT(1, 1, 4, 3, 1, true), SPARSIFY_FLAT(1, 1, 2, 3, 1, true),
    SPARSIFY_FLAT(1, 1, 1, 3, 2, true),
    SPARSIFY_FLAT(1, 2, 4, 2, 1, true), SPARSIFY_FLAT(1, 2, 8, 1, 1, true),
    SPARSIFY_FLAT(1, 2, 7, 1, 1, true), SPARSIFY_FLAT(1, 2, 2, 3, 1, true),
    SPARSIFY_FLAT(1, 3, 4, 1, 1, true), SPARSIFY_FLAT(1, 3, 2, 2, 1, true),
    SPARSIFY_FLAT(1, 4, 4, 1, 1, true), SPARSIFY_FLAT(1, 4, 2, 2, 1, true),
    SPARSIFY_FLAT(1, 4, 4, 1, 1, false), SPARSIFY_FLAT(1, 4, 2, 2, 1, false),
    SPARSIFY_FLAT(1, 2, 4, 2, 1, false),
#if SPARSIFY_VBYTES >= 32
    SPARSIFY_FLAT(2, 1, 4, 3, 1, false), SPARSIFY_FLAT(2, 1, 8, 2, 1, false),
    SPARSIFY_FLAT(2, 1, 2, 3, 1, false), SPARSIFY_FLAT(2, 1, 1, 3, 2, false),
#endif
#if SPARSIFY_VBYTES >= 64
    SPARSIFY_FLAT(4, 1, 1, 3, 4, false), SPARSIFY_FLAT(4, 1, 2, 3, 2, false),
    SPARSIFY_FLAT(4, 1, 4, 3, 1, false),
#endif
#else
    SPARSIFY_FLAT(1, 1, 4, 1, 1, true), SPARSIFY_FLAT(1, 1, 2, 2, 1, true),
    SPARSIFY_FLAT(1, 2, 2, 1, 1, true), SPARSIFY_FLAT(1, 2, 2, 1, 1, false),
    SPARSIFY_FLAT(1, 1, 4, 1, 1, false),
#if SPARSIFY_VBYTES >= 32
    SPARSIFY_FLAT(2, 1, 2, 2, 1, false), SPARSIFY_FLAT(2, 1, 4, 1, 1, false),
#endif
#endif
};
#undef SPARSIFY_FLAT
constexpr int kNumFlatCfgs = sizeof(kFlatCfgs) / sizeof(kFlatCfgs[0]);

// Modelled cycles per output channel and connection: FMAs at two per cycle, loads (input vectors
// plus nine weight broadcasts) at two per cycle, and no faster than the NS*NC interleaved
// chains of dependent 4-cycle FMAs allow; plus a little overhead per block.
int pick_flat(int64_t Ho, int64_t nvr, int P) {
  int best = -1;
  double best_cost = 0.0;
  for (int i = 0; i < kNumFlatCfgs; ++i) {
    const FlatCfg& c = kFlatCfgs[i];
    if (c.P != P || (c.full && c.NV != nvr) || (!c.full && P == 1 && c.NV >= nvr)) continue;
    const double blocks = double(cdiv(Ho, int64_t(c.RB) * P)) * double(cdiv(nvr, c.NV));
    const double fma = double(c.RB) * c.NV * 9;
    const double loads = 3.0 * ((c.RB - 1) * P + 3) * c.NV + 9;
    double cyc = fma / 2;
    if (loads / 2 > cyc) cyc = loads / 2;
    const double chain = 4.0 * 9 / (c.NS * c.NC);
    if (chain > cyc) cyc = chain;
    const double cost = blocks * (cyc + 3.0);
    if (best < 0 || cost < best_cost) {
      best = i;
      best_cost = cost;
    }
  }
  return best;
}

// Fills a kFlat3 plan, or returns false when no flat config fits this plane.
bool make_flat_plan(const Geom& g, Plan* p) {
  int64_t ws = cdiv(g.Wo, VL) * VL;
  int P = 1;
  while (P < 4 && VL % (2 * P) == 0 && g.Wo <= VL / (2 * P)) P *= 2;
  if (P > 1) ws = VL / P;
  const int cfg = pick_flat(g.Ho, P == 1 ? ws / VL : 1, P);
  if (cfg < 0) return false;
  const FlatCfg& c = kFlatCfgs[cfg];
  p->kind = kFlat3;
  p->K = 3;
  p->S = 1;
  p->cfg = cfg;
  p->P = P;
  p->R = c.RB;
  p->V = c.NV;
  p->ws = ws;
  p->nvr = int32_t(P == 1 ? ws / VL : 1);
  const int64_t rows_blk = int64_t(c.RB) * P;
  p->Hp = cdiv(g.Ho, rows_blk) * rows_blk + 2;  // input rows incl. the bottom halo
  // 'Same' convs on AVX-512 with whole-row blocks read an unshifted copy with aligned rows of
  // exactly ws floats (the kx shifts are lane rotations); others a copy padded by pl / pr.
  p->align = P == 1 && c.fn_align != nullptr && g.pl == 1 && g.pr == 1;
  if (P == 1) {
    p->Wps = p->align ? ws : ws + 2;
    p->kxs = 1;
    p->plane = cdiv(p->Hp * p->Wps, 16) * 16;
  } else {
    p->Wps = ws;
    p->kxs = cdiv(p->Hp * ws, 16) * 16;
    p->plane = 3 * p->kxs;
  }
  // Tasks walk the plane one row block at a time over all their output channels, so the block's
  // input rows of every input channel stay in cache while each output channel reads them.
  p->strip = rows_blk >= g.Ho ? g.Ho : rows_blk;
  return true;
}

void flat_pad_channel(const Geom& g, const Plan& p, const float* __restrict x, float* __restrict xp) {
  if (p.align) {
    // Unshifted rows of ws >= W floats between zero halo rows: one block copy when W == ws.
    const int64_t top = g.pt < p.Hp ? g.pt : p.Hp;
    const int64_t rows = g.H < p.Hp - top ? g.H : p.Hp - top;
    std::memset(xp, 0, sizeof(float) * top * p.ws);
    float* dst = xp + top * p.ws;
    if (g.W == p.ws) {
      std::memcpy(dst, x, sizeof(float) * rows * g.W);
    } else {
      const int64_t full = g.W / VL * VL;
      for (int64_t r = 0; r < rows; ++r) {
        const float* src = x + r * g.W;
        float* row = dst + r * p.ws;
        for (int64_t c = 0; c < full; c += VL) storeu(row + c, loadu(src + c));
        for (int64_t c = full; c < g.W; ++c) row[c] = src[c];
        for (int64_t c = g.W; c < p.ws; ++c) row[c] = 0.0f;
      }
    }
    std::memset(dst + rows * p.ws, 0, sizeof(float) * (p.Hp - top - rows) * p.ws);
    return;
  }
  if (p.P > 1 && g.pl < VL && g.W + g.pl <= VL) {
    // Narrow planes: each input row is placed once in a zeroed line buffer at its left pad, and
    // the three kx-shifted rows are vectors loaded from it at offsets 0, 1, 2 (a memset / memcpy
    // per row and copy was 80% of a 3x3 128->32 layer on 7x7 at density 0.1).
    const int64_t ws = p.Wps;
    for (int kx = 0; kx < 3; ++kx) std::memset(xp + kx * p.kxs + p.Hp * ws, 0, sizeof(float) * (p.kxs - p.Hp * ws));
#if SPARSIFY_VBYTES == 64 && defined(__AVX512F__)
    // AVX-512: each shifted row is one masked load straight from the input row (lanes whose
    // source column is outside the row are zero and never read).
    __mmask16 m[3];
    for (int kx = 0; kx < 3; ++kx) {
      uint32_t bits = 0;
      for (int64_t c = 0; c < ws; ++c)
        if (c + kx - g.pl >= 0 && c + kx - g.pl < g.W) bits |= 1u << c;
      m[kx] = __mmask16(bits);
    }
    const __mmask16 wmask = __mmask16((1u << ws) - 1u);
    for (int64_t r = 0; r < p.Hp; ++r) {
      const int64_t ir = r - g.pt;
      const bool inside = ir >= 0 && ir < g.H;
#pragma GCC unroll 3
      for (int kx = 0; kx < 3; ++kx) {
        const __m512 v = inside ? _mm512_maskz_loadu_ps(m[kx], x + ir * g.W + kx - g.pl) : _mm512_setzero_ps();
        float* dst = xp + kx * p.kxs + r * ws;
        if (ws == 8) _mm256_storeu_ps(dst, _mm512_castps512_ps256(v));  // plain stores: masked ones are slow
        else if (ws == 4) _mm_storeu_ps(dst, _mm512_castps512_ps128(v));
        else _mm512_mask_storeu_ps(dst, wmask, v);
      }
    }
    return;
#endif
    alignas(64) float t[3 * VL];
    for (int64_t r = 0; r < p.Hp; ++r) {
      const int64_t ir = r - g.pt;
      storeu(t, vf{});
      storeu(t + VL, vf{});
      if (ir >= 0 && ir < g.H)
        for (int64_t c = 0; c < g.W; ++c) t[g.pl + c] = x[ir * g.W + c];
#pragma GCC unroll 3
      for (int kx = 0; kx < 3; ++kx) store_first(xp + kx * p.kxs + r * ws, loadu(t + kx), ws);
    }
    return;
  }
#if defined(__AVX512F__)
  if (p.P == 1 && !p.align && p.Wps <= 16 && g.pl < p.Wps) {
    // Rows of at most 16 floats (7x7 .. 14x14 planes in 8-float vectors): each padded row is one
    // masked load from the input row at its left pad (a memset / memcpy per row cost more than
    // the 7x7 layer's arithmetic on the narrow ISA).
    uint32_t bits = 0;
    for (int64_t c = 0; c < p.Wps; ++c)
      if (c - g.pl >= 0 && c - g.pl < g.W) bits |= 1u << c;
    const __mmask16 m = __mmask16(bits), wmask = __mmask16((1u << p.Wps) - 1u);
    for (int64_t r = 0; r < p.Hp; ++r) {
      const int64_t ir = r - g.pt;
      const __m512 v = ir >= 0 && ir < g.H ? _mm512_maskz_loadu_ps(m, x + ir * g.W - g.pl) : _mm512_setzero_ps();
      _mm512_mask_storeu_ps(xp + r * p.Wps, wmask, v);
    }
    std::memset(xp + p.Hp * p.Wps, 0, sizeof(float) * (p.plane - p.Hp * p.Wps));
    return;
  }
#endif
  const int ncopies = p.P == 1 ? 1 : 3;
  for (int kx = 0; kx < ncopies; ++kx) {
    float* dst = xp + kx * p.kxs;
    const int64_t width = p.Wps;
    for (int64_t r = 0; r < p.Hp; ++r) {
      float* row = dst + r * width;
      const int64_t ir = r - g.pt;
      if (ir < 0 || ir >= g.H) {
        std::memset(row, 0, sizeof(float) * width);
        continue;
      }
      const float* src = x + ir * g.W;
      // row[c] = x[ir][c + kx - pl] where that is inside the input, else 0 (the aligned layout
      // is the kx = 1 copy).
      const int64_t shift = (p.align ? 1 : kx) - g.pl;
      int64_t c0 = -shift > 0 ? -shift : 0;
      if (c0 > width) c0 = width;
      int64_t c1 = g.W - shift;
      if (c1 > width) c1 = width;
      if (c1 < c0) c1 = c0;
      std::memset(row, 0, sizeof(float) * c0);
      std::memcpy(row + c0, src + c0 + shift, sizeof(float) * (c1 - c0));
      std::memset(row + c1, 0, sizeof(float) * (width - c1));
    }
    if (ncopies > 1) std::memset(dst + p.Hp * width, 0, sizeof(float) * (p.kxs - p.Hp * width));
  }
}

// ---------------------------------------------------------------------------------------------
// Small-plane path (AVX-512 only): 3x3 "same" convolution (stride 1, pads 1) on planes of at
// most 4 vectors whose rows divide the vector (8x8, 4x4, 2x2, 16xH<=4). The input plane is read
// straight from X (masked loads, no padded copy) into registers; the planes shifted by a row are
// lane rotations (valignd) of neighbouring vectors, and the kx = 0 / 2 taps rotate those by one
// lane, zeroing the lanes that fall in the padding: at 8x8 23 rotations per 36 FMAs.
#if SPARSIFY_VBYTES == 64 && defined(__AVX512F__)
constexpr bool kHasSmall = true;

bool make_small_plan(const Geom& g, Plan* p) {
  if (!(g.pt == 1 && g.pl == 1 && g.pb == 1 && g.pr == 1) || VL % g.W != 0 || g.H * g.W > 4 * VL)
    return false;
  for (int kx = 0; kx < 3; ++kx) {
    uint32_t mask = 0;
    for (int64_t L = 0; L < VL; ++L) {
      const int64_t c = L % g.W + kx - 1;
      if (c >= 0 && c < g.W) mask |= 1u << L;
    }
    p->smask[kx] = mask;
  }
  p->kind = kSmall3;
  p->K = 3;
  p->S = 1;
  p->V = int32_t(cdiv(g.H * g.W, VL));
  return true;
}

template <int W, int NV, int NS, int NC>
void small3_channel(const Geom& g, const Plan& p, const float* __restrict x_n, float* __restrict y,
                    const float* __restrict w_row, const int64_t* __restrict cols, int64_t cnt,
                    float bias, int64_t cin_base) {
  const int64_t hw = g.H * g.W;
  const __mmask16 last = __mmask16((1u << (hw - (NV - 1) * VL)) - 1u);
  const __mmask16 m0 = __mmask16(p.smask[0]), m2 = __mmask16(p.smask[2]);
  __m512 acc[NC][NS][NV];
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c)
#pragma GCC unroll 16
    for (int s = 0; s < NS; ++s)
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j)
        acc[c][s][j] = (c == 0 && s == 0) ? _mm512_set1_ps(bias) : _mm512_setzero_ps();
  const float* xg = x_n + cin_base * hw;
  const __m512 z = _mm512_setzero_ps();
  constexpr int ky_shift = VL - W;  // rotating by VL - W lanes brings in the previous row
  auto one = [&](__m512 (&a)[NS][NV], int64_t k) __attribute__((always_inline)) {
    const float* src = xg + cols[k] * hw;
    const float* w = w_row + k * 9;
    __m512 wv[9];
#pragma GCC unroll 9
    for (int t = 0; t < 9; ++t) wv[t] = _mm512_set1_ps(w[t]);
    __m512i v[NV + 2];  // v[0] and v[NV + 1] are the zero rows above and below the plane
    v[0] = v[NV + 1] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      v[j + 1] = _mm512_castps_si512(j + 1 < NV ? _mm512_loadu_ps(src + j * VL)
                                                : _mm512_maskz_loadu_ps(last, src + j * VL));
    // One row-shifted plane b feeds tap row ky of output vector j (and ky2 of j2 when >= 0):
    // the kx = 0 / 2 taps are b rotated by one lane, zeroed where the source column is padding.
    auto apply = [&](__m512i b, int ky, int j, int ky2, int j2) __attribute__((always_inline)) {
#pragma GCC unroll 3
      for (int kx = 0; kx < 3; ++kx) {
        __m512 tv;
        if (kx == 1) tv = _mm512_castsi512_ps(b);
        else if (kx == 0) tv = _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(m0, b, _mm512_setzero_si512(), 15));
        else tv = _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(m2, _mm512_setzero_si512(), b, 1));
        if (j >= 0) a[(ky * 3 + kx) % NS][j] = _mm512_fmadd_ps(wv[ky * 3 + kx], tv, a[(ky * 3 + kx) % NS][j]);
        if (j2 >= 0) a[(ky2 * 3 + kx) % NS][j2] = _mm512_fmadd_ps(wv[ky2 * 3 + kx], tv, a[(ky2 * 3 + kx) % NS][j2]);
      }
    };
    // The unshifted rows' kx = 0 / 2 taps are masked loads one float before / after (they use
    // the load ports, which the rotations leave idle; masked-off lanes are never read).
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      const __mmask16 valid = j + 1 < NV ? __mmask16(0xffff) : last;
      const __m512 t0 = _mm512_maskz_loadu_ps(m0 & valid, src + j * VL - 1);
      const __m512 t2 = _mm512_maskz_loadu_ps(m2 & valid, src + j * VL + 1);
      a[3 % NS][j] = _mm512_fmadd_ps(wv[3], t0, a[3 % NS][j]);
      a[4 % NS][j] = _mm512_fmadd_ps(wv[4], _mm512_castsi512_ps(v[j + 1]), a[4 % NS][j]);
      a[5 % NS][j] = _mm512_fmadd_ps(wv[5], t2, a[5 % NS][j]);
    }
    if constexpr (ky_shift == VL / 2) {
      // Two rows per vector: the plane shifted up by a row for output vector m is the plane
      // shifted down by a row for vector m - 1.
#pragma GCC unroll 5
      for (int m = 0; m <= NV; ++m)
        apply(_mm512_alignr_epi32(v[m + 1], v[m], VL / 2), 0, m < NV ? m : -1, 2, m - 1);
    } else {
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        // Rows r-1 .. : the last row of the previous vector, then this vector's rows.
        apply(ky_shift == 0 ? v[j] : _mm512_alignr_epi32(v[j + 1], v[j], ky_shift % VL), 0, j, 0, -1);
        apply(ky_shift == 0 ? v[j + 2] : _mm512_alignr_epi32(v[j + 2], v[j + 1], W % VL), 2, j, 0, -1);
      }
    }
  };
  over_connections<NC>(cnt, [&](int c, int64_t k) __attribute__((always_inline)) { one(acc[c], k); });
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c)
#pragma GCC unroll 16
    for (int s = 0; s < NS; ++s) {
      if (c == 0 && s == 0) continue;
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) acc[0][0][j] = _mm512_add_ps(acc[0][0][j], acc[c][s][j]);
    }
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    if (j + 1 < NV) _mm512_storeu_ps(y + j * VL, acc[0][0][j]);
    else _mm512_mask_storeu_ps(y + j * VL, last, acc[0][0][j]);
  }
}

template <int W>
void small_w(const Geom& g, const Plan& p, const float* x_n, float* y, const float* w_row,
             const int64_t* cols, int64_t cnt, float bias, int64_t cin_base) {
  switch (p.V) {
    case 1: return small3_channel<W, 1, 3, 3>(g, p, x_n, y, w_row, cols, cnt, bias, cin_base);
    case 2: return small3_channel<W, 2, 2, 2>(g, p, x_n, y, w_row, cols, cnt, bias, cin_base);
    case 3: return small3_channel<W, 3, 3, 1>(g, p, x_n, y, w_row, cols, cnt, bias, cin_base);
    default: return small3_channel<W, 4, 3, 1>(g, p, x_n, y, w_row, cols, cnt, bias, cin_base);
  }
}

void small_channel(const Geom& g, const Plan& p, const float* x_n, float* y, const float* w_row,
                   const int64_t* cols, int64_t cnt, float bias, int64_t cin_base) {
  switch (g.W) {
    case 1: return small_w<1>(g, p, x_n, y, w_row, cols, cnt, bias, cin_base);
    case 2: return small_w<2>(g, p, x_n, y, w_row, cols, cnt, bias, cin_base);
    case 4: return small_w<4>(g, p, x_n, y, w_row, cols, cnt, bias, cin_base);
    case 8: return small_w<8>(g, p, x_n, y, w_row, cols, cnt, bias, cin_base);
    default: return small_w<16>(g, p, x_n, y, w_row, cols, cnt, bias, cin_base);
  }
}
// 2x2 planes (3x3 'same' conv, e.g. the last block of a VGG on 32x32 inputs): every output
// pixel p sees every input pixel q through tap (qy - py + 1, qx - px + 1), so one connection is
// a 4x4 outer product, exactly one 16-lane FMA: lanes (p, q) of the connection's nine weights
// permuted into place times the input plane broadcast to the four p groups. The per-pixel path
// spent nine FMAs with three quarters of their lanes idle. Sums over q at the end.
void tiny2_channel(const float* __restrict x_n, float* __restrict y, const float* __restrict w_row,
                   const int64_t* __restrict cols, int64_t cnt, float bias, int64_t cin_base) {
  alignas(64) static const int32_t kTap[16] = {4, 5, 7, 8, 3, 4, 6, 7, 1, 2, 4, 5, 0, 1, 3, 4};
  const __m512i tap = _mm512_load_si512(kTap);
  const float* xg = x_n + cin_base * 4;
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  auto one = [&](int a, int64_t k) __attribute__((always_inline)) {
    const __m512 w = _mm512_permutexvar_ps(tap, _mm512_maskz_loadu_ps(__mmask16(0x1ff), w_row + k * 9));
    const __m512 x = _mm512_broadcast_f32x4(_mm_loadu_ps(xg + cols[k] * 4));
    acc[a] = _mm512_fmadd_ps(w, x, acc[a]);
  };
  over_connections<4>(cnt, one);
  __m512 s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
  // Lane 4p + q -> sum over q into lane 4p, then lanes 0, 4, 8, 12 to the four outputs.
  s = _mm512_add_ps(s, _mm512_permute_ps(s, 0xB1));  // swap neighbours
  s = _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E));  // swap pairs
  alignas(64) static const int32_t kPick[16] = {0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  s = _mm512_permutexvar_ps(_mm512_load_si512(kPick), s);
  _mm512_mask_storeu_ps(y, __mmask16(0xf), _mm512_add_ps(s, _mm512_set1_ps(bias)));
}

// The same planes by input channel (CSC): for each output vector j and each input channel, the
// nine shifted copies of the input are built once in registers, then every live connection from
// that channel adds its nine taps into its output vector in memory (the block's outputs stay in
// L1). The rotations are paid once per input channel instead of once per connection, and each
// weight is an FMA's broadcast memory operand: at 4x4 the per-connection path spends six
// rotations per nine FMAs. Planes must be whole vectors (H * W == NV * VL).
template <int W, int NV>
void csc3_block_t(const Geom& g, const Plan& p, const float* __restrict x_n, float* __restrict y_n,
                  const float* __restrict bias, const CscBlock& b) {
  constexpr int64_t hw = int64_t(NV) * VL;
  for (int64_t o = b.o_begin; o < b.o_end; ++o) {
    const __m512 v0 = _mm512_set1_ps(bias != nullptr ? bias[o] : 0.0f);
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(y_n + o * hw + j * VL, v0);
  }
  const __mmask16 m0 = __mmask16(p.smask[0]), m2 = __mmask16(p.smask[2]);
  const __m512i zero = _mm512_setzero_si512();
  const int64_t* __restrict out = b.out;
  const float* __restrict wts = b.w;
  // The nine shifted copies of input vector j of channel `chan`, lined up with output vector j.
  auto shifted = [&](int j, int64_t chan, __m512 (&t)[9]) __attribute__((always_inline)) {
    const float* src = x_n + chan * hw + j * VL;
    const __m512i cur = _mm512_castps_si512(_mm512_loadu_ps(src));
    const __m512i prev = j > 0 ? _mm512_castps_si512(_mm512_loadu_ps(src - VL)) : zero;
    const __m512i next = j + 1 < NV ? _mm512_castps_si512(_mm512_loadu_ps(src + VL)) : zero;
    // Input rows r - 1, r, r + 1 lined up with the output rows r of vector j.
    __m512i rows[3];
    if constexpr (W == VL) {
      rows[0] = prev;
      rows[2] = next;
    } else {
      rows[0] = _mm512_alignr_epi32(cur, prev, (VL - W) % VL);
      rows[2] = _mm512_alignr_epi32(next, cur, W % VL);
    }
    rows[1] = cur;
#pragma GCC unroll 3
    for (int ky = 0; ky < 3; ++ky) {
      t[ky * 3 + 0] = _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(m0, rows[ky], zero, 15));
      t[ky * 3 + 1] = _mm512_castsi512_ps(rows[ky]);
      t[ky * 3 + 2] = _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(m2, zero, rows[ky], 1));
    }
  };
  if constexpr (NV % 2 == 0) {
    // Two output vectors per pass: each connection's nine weights are broadcast once into
    // registers for eighteen FMAs (one chain per vector; consecutive connections overlap).
    for (int j = 0; j < NV; j += 2) {
      float* yj = y_n + j * VL;
      for (int64_t c = 0; c < b.ncols; ++c) {
        __m512 t0[9], t1[9];
        shifted(j, b.chan[c], t0);
        shifted(j + 1, b.chan[c], t1);
        for (int64_t q = b.start[c]; q < b.start[c + 1]; ++q) {
          float* yo = yj + out[q] * hw;
          const float* w = wts + q * 9;
          __m512 wv[9];
#pragma GCC unroll 9
          for (int k = 0; k < 9; ++k) wv[k] = _mm512_set1_ps(w[k]);
          __m512 a0 = _mm512_loadu_ps(yo), a1 = _mm512_loadu_ps(yo + VL);
#pragma GCC unroll 9
          for (int k = 0; k < 9; ++k) {
            a0 = _mm512_fmadd_ps(t0[k], wv[k], a0);
            a1 = _mm512_fmadd_ps(t1[k], wv[k], a1);
          }
          _mm512_storeu_ps(yo, a0);
          _mm512_storeu_ps(yo + VL, a1);
        }
      }
    }
    return;
  }
  for (int j = 0; j < NV; ++j) {
    float* yj = y_n + j * VL;
    for (int64_t c = 0; c < b.ncols; ++c) {
      const int64_t q0 = b.start[c], q1 = b.start[c + 1];
      __m512 t[9];
      shifted(j, b.chan[c], t);
      for (int64_t q = q0; q < q1; ++q) {
        float* yo = yj + out[q] * hw;
        const float* w = wts + q * 9;
        // Three chains of three FMAs (not one of nine) so consecutive connections overlap.
        __m512 a = _mm512_mul_ps(t[0], _mm512_set1_ps(w[0]));
        __m512 s1 = _mm512_mul_ps(t[1], _mm512_set1_ps(w[1]));
        __m512 s2 = _mm512_mul_ps(t[2], _mm512_set1_ps(w[2]));
        a = _mm512_fmadd_ps(t[3], _mm512_set1_ps(w[3]), a);
        s1 = _mm512_fmadd_ps(t[4], _mm512_set1_ps(w[4]), s1);
        s2 = _mm512_fmadd_ps(t[5], _mm512_set1_ps(w[5]), s2);
        a = _mm512_fmadd_ps(t[6], _mm512_set1_ps(w[6]), a);
        s1 = _mm512_fmadd_ps(t[7], _mm512_set1_ps(w[7]), s1);
        s2 = _mm512_fmadd_ps(t[8], _mm512_set1_ps(w[8]), s2);
        _mm512_storeu_ps(yo, _mm512_add_ps(_mm512_loadu_ps(yo), _mm512_add_ps(a, _mm512_add_ps(s1, s2))));
      }
    }
  }
}

template <int W>
void csc3_w(const Geom& g, const Plan& p, const float* x_n, float* y_n, const float* bias,
            const CscBlock& b) {
  switch (p.V) {
    case 1: return csc3_block_t<W, 1>(g, p, x_n, y_n, bias, b);
    case 2: return csc3_block_t<W, 2>(g, p, x_n, y_n, bias, b);
    case 3: return csc3_block_t<W, 3>(g, p, x_n, y_n, bias, b);
    default: return csc3_block_t<W, 4>(g, p, x_n, y_n, bias, b);
  }
}

void csc3_block(const Geom& g, const Plan& p, const float* x_n, float* y_n, const float* bias,
                const CscBlock& b) {
  switch (g.W) {
    case 1: return csc3_w<1>(g, p, x_n, y_n, bias, b);
    case 2: return csc3_w<2>(g, p, x_n, y_n, bias, b);
    case 4: return csc3_w<4>(g, p, x_n, y_n, bias, b);
    case 8: return csc3_w<8>(g, p, x_n, y_n, bias, b);
    default: return csc3_w<16>(g, p, x_n, y_n, bias, b);
  }
}
constexpr auto kCscBlock = &csc3_block;
#else
constexpr bool kHasSmall = false;
bool make_small_plan(const Geom&, Plan*) { return false; }
void small_channel(const Geom&, const Plan&, const float*, float*, const float*, const int64_t*,
                   int64_t, float, int64_t) {}
constexpr void (*kCscBlock)(const Geom&, const Plan&, const float*, float*, const float*,
                            const CscBlock&) = nullptr;
void tiny2_channel(const float*, float*, const float*, const int64_t*, int64_t, float, int64_t) {}
#endif

// ---------------------------------------------------------------------------------------------
// Depthwise path (AVX-512, 16- or 8-float vectors): K = 3 or 5, stride 1 or 2, one input channel
// per output channel (cin_per_group == 1, e.g. MobileNet / EfficientNet blocks). The plane is
// computed straight from X: each tap of a vector of output pixels is one masked load of its input
// row (lanes whose source column is padding read nothing and are zero), so there is no padded
// copy, which cost as much as the K*K FMAs per output vector themselves. Stride 2 loads two
// vectors per pair of taps (kx = 2m, 2m + 1) and splits them into even and odd columns.
#if SPARSIFY_MASKED
constexpr bool kHasDw = true;

// R output rows at a time (each loaded input row feeds every output row that needs it), two
// accumulator chains per row (taps of even / odd kernel rows). K = 3 keeps its nine weights in
// registers; K = 5 broadcasts each weight from w in its FMA (25 would not fit beside the block).
template <int K, int S, int R>
void dw_channel(const Geom& g, const float* __restrict xc, float* __restrict y, const float* __restrict w,
                float bias) {
  const int64_t H = g.H, W = g.W, Ho = g.Ho, Wo = g.Wo, pt = g.pt, pl = g.pl;
  // Loads per input row: one per tap (stride 1), two per pair of taps (stride 2).
  constexpr int NL = S == 1 ? K : 2 * ((K + 1) / 2);
  constexpr int ROWS = S * (R - 1) + K;  // input rows of R output rows
  constexpr bool kRegW = K <= 3;
  vf wv[kRegW ? K * K : 1];
  if constexpr (kRegW) {
#pragma GCC unroll 9
    for (int t = 0; t < K * K; ++t) wv[t] = bcast(w[t]);
  }
  const vf b0 = bcast(bias);
  const vi even = kEven, odd = kEven + 1;
  // Column strips of one vector, top to bottom: the strip's load masks and column offsets are
  // worked out once (the masks per load cost more than the FMAs when computed per row).
  for (int64_t x0 = 0; x0 < Wo; x0 += VL) {
    int64_t off[NL];
    uint32_t m[NL];
#pragma GCC unroll 6
    for (int l = 0; l < NL; ++l) {
      off[l] = S == 1 ? x0 + l - pl : 2 * x0 + 2 * (l / 2) - pl + (l % 2) * VL;
      m[l] = lanes_in(off[l], W);
    }
    const int64_t tail = Wo - x0 < VL ? Wo - x0 : VL;
    for (int64_t oy0 = 0; oy0 < Ho; oy0 += R) {
      vf acc[R][2];
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) acc[j][0] = b0, acc[j][1] = vf{};
      const float* wk = w;
#pragma GCC unroll 16
      for (int rr = 0; rr < ROWS; ++rr) {
        const int64_t iy = oy0 * S + rr - pt;
        if (iy < 0 || iy >= H) continue;
        const float* row = xc + iy * W;
        if constexpr (!kRegW) launder(wk);
        auto tap = [&](int kx, vf in) __attribute__((always_inline)) {
#pragma GCC unroll 8
          for (int j = 0; j < R; ++j) {
            const int ky = rr - S * j;
            if (ky < 0 || ky >= K) continue;
            const vf wt = kRegW ? wv[kRegW ? ky * K + kx : 0] : bcast(wk[ky * K + kx]);
            acc[j][ky & 1] += wt * in;
          }
        };
        if constexpr (S == 1) {
#pragma GCC unroll 5
          for (int kx = 0; kx < K; ++kx) tap(kx, load_mask(row + off[kx], m[kx]));
        } else {
#pragma GCC unroll 3
          for (int q = 0; q < (K + 1) / 2; ++q) {
            const vf a = load_mask(row + off[2 * q], m[2 * q]), b = load_mask(row + off[2 * q + 1], m[2 * q + 1]);
            tap(2 * q, __builtin_shuffle(a, b, even));
            if (2 * q + 1 < K) tap(2 * q + 1, __builtin_shuffle(a, b, odd));
          }
        }
      }
      float* out = y + oy0 * Wo + x0;
#pragma GCC unroll 8
      for (int j = 0; j < R && oy0 + j < Ho; ++j, out += Wo) {
        const vf r = acc[j][0] + acc[j][1];
        if (tail == VL) storeu(out, r);
        else store_first(out, r, tail);
      }
    }
  }
}

void dw_plane(const Geom& g, const Plan& p, const float* x_n, float* y, const float* w_row, const int64_t* cols,
              int64_t cnt, float bias, int64_t cin_base) {
  alignas(64) static const float kZero[25] = {};
  const float* xc = x_n + (cin_base + (cnt > 0 ? cols[0] : 0)) * g.H * g.W;
  const float* w = cnt > 0 ? w_row : kZero;
  if (p.K == 3) {
    if (p.S == 1) dw_channel<3, 1, 4>(g, xc, y, w, bias);
    else dw_channel<3, 2, 4>(g, xc, y, w, bias);
  } else {
    if (p.S == 1) dw_channel<5, 1, 4>(g, xc, y, w, bias);
    else dw_channel<5, 2, 4>(g, xc, y, w, bias);
  }
}
#else
constexpr bool kHasDw = false;
void dw_plane(const Geom&, const Plan&, const float*, float*, const float*, const int64_t*, int64_t, float, int64_t) {}
#endif

// ---------------------------------------------------------------------------------------------

void make_plan(const Geom& g, Plan* p) {
  std::memset(p, 0, sizeof(*p));
  p->VL = VL;
  const int64_t Hpad = g.H + g.pt + g.pb, Wpad = g.W + g.pl + g.pr;
  const bool pointwise = g.kH == 1 && g.kW == 1 && g.pt == 0 && g.pl == 0 && g.pb == 0 && g.pr == 0;
  const bool direct = g.kH == g.kW && (g.kH == 1 || g.kH == 3 || g.kH == 5 || g.kH == 7) &&
                      g.sH == g.sW && (g.sH == 1 || g.sH == 2) && g.dH == 1 && g.dW == 1;
  if (kHasDw && g.cin_per_group == 1 && g.kH == g.kW && (g.kH == 3 || g.kH == 5) && g.sH == g.sW &&
      (g.sH == 1 || g.sH == 2) && g.dH == 1 && g.dW == 1 && g.pt < g.kH && g.pl < g.kW) {
    p->kind = kDepthwise;
    p->reads_x = 1;
    p->K = int32_t(g.kH);
    p->S = int32_t(g.sH);
    return;
  }
  if (pointwise) {
    p->reads_x = 1;
    p->kind = kPointwise;
    p->K = 1;
    p->S = int32_t(g.sH);
    return;
  }
  if (direct && g.kH == 3 && g.sH == 1 && kHasSmall && g.H == 2 && g.W == 2 && g.pt == 1 &&
      g.pl == 1 && g.pb == 1 && g.pr == 1) {
    p->kind = kTiny2;
    p->reads_x = 1;
    p->K = 3;
    p->S = 1;
    return;
  }
  if (direct && g.kH == 3 && g.sH == 1 && kHasSmall && make_small_plan(g, p)) {
    p->reads_x = 1;
    return;
  }
  if (direct && g.kH == 3 && g.sH == 1 && make_flat_plan(g, p)) return;
  if (direct) {
    const int K = int(g.kH), S = int(g.sH);
    const int cfg = pick_cfg(K, S, g.Ho, g.Wo);
    p->kind = kDirect;
    p->cfg = cfg;
    p->K = K;
    p->S = S;
    p->R = kCfgs[cfg].R;
    p->V = kCfgs[cfg].V;
    p->bcfg = pick_block_cfg(K, S, p->R, p->V);
    const int64_t wo_round = cdiv(cdiv(g.Wo, VL), p->V) * p->V * VL;
    const int64_t ho_round = cdiv(g.Ho, p->R) * p->R;
    // Every load of a (possibly wasted) edge block must stay inside the zero-filled buffer.
    p->Wps = imax(cdiv(Wpad, S), wo_round + (K - 1) / S);
    p->Hp = imax(Hpad, S * (ho_round - 1) + K);
    p->phase = S == 1 ? 0 : p->Hp * p->Wps;
    p->plane = cdiv(S * p->Hp * p->Wps, 16) * 16;
    p->strip = p->R;  // output channels walk one register block of rows at a time (see kFlat3)
    return;
  }
  p->kind = kGeneric;
  p->K = 0;
  p->S = 1;
  p->Hp = Hpad;
  p->Wps = Wpad;
  p->plane = cdiv(Hpad * Wpad, 16) * 16;
}

// Floats of the line buffer that stride-2 padding deinterleaves from.
constexpr int64_t kPadRow = 4096;

// Stride-2 rows: padded row t (t[c] = input column c - pl, 0 outside) split into its even
// columns (phase 0) and odd columns (phase 1), each p.Wps floats, in one pass over the row.
void pad_row_s2(const Geom& g, const Plan& p, const float* __restrict src, float* __restrict even,
                float* __restrict odd) {
#if !SPARSIFY_MASKED
  // Without masked loads: the zero-padded row in a line buffer first (a scalar split here was 40%
  // of a 3x3/s2 layer on 56x56).
  const int64_t n = 2 * cdiv(p.Wps, VL) * VL;
  if (n > kPadRow) {
    for (int64_t c = 0; c < p.Wps; ++c) {
      const int64_t i0 = 2 * c - g.pl, i1 = i0 + 1;
      even[c] = (i0 >= 0 && i0 < g.W) ? src[i0] : 0.0f;
      odd[c] = (i1 >= 0 && i1 < g.W) ? src[i1] : 0.0f;
    }
    return;
  }
  alignas(64) float t[kPadRow];
  const int64_t left = g.pl < n ? g.pl : n, cnt = g.W < n - left ? g.W : n - left;
  std::memset(t, 0, sizeof(float) * left);
  std::memcpy(t + left, src, sizeof(float) * cnt);
  std::memset(t + left + cnt, 0, sizeof(float) * (n - left - cnt));
#endif
  // Padded columns [2c, 2c + 2 VL) as two vectors, split into even and odd lanes.
  for (int64_t c = 0; c < p.Wps; c += VL) {
#if SPARSIFY_MASKED
    // Masked loads at input column 2c - pl: lanes outside the row are zero and never read.
    const int64_t first = 2 * c - g.pl;
    const vf a = load_mask(src + first, lanes_in(first, g.W)), b = load_mask(src + first + VL, lanes_in(first + VL, g.W));
#else
    const vf a = loadu(t + 2 * c), b = loadu(t + 2 * c + VL);
#endif
    const vf e = __builtin_shuffle(a, b, kEven), o = __builtin_shuffle(a, b, kEven + 1);
    if (c + VL <= p.Wps) {
      storeu(even + c, e);
      storeu(odd + c, o);
    } else {
      store_first(even + c, e, p.Wps - c);
      store_first(odd + c, o, p.Wps - c);
    }
  }
}

void pad_channel(const Geom& g, const Plan& p, const float* __restrict x, float* __restrict xp) {
  if (p.kind == kFlat3) {
    flat_pad_channel(g, p, x, xp);
    return;
  }
  const int64_t S = p.kind == kDirect ? p.S : 1;
  for (int64_t r = 0; r < p.Hp; ++r) {
    float* row = xp + r * p.Wps;
    const int64_t ir = r - g.pt;
    if (ir < 0 || ir >= g.H) {
      for (int64_t ph = 0; ph < S; ++ph) std::memset(row + ph * p.phase, 0, sizeof(float) * p.Wps);
      continue;
    }
    const float* src = x + ir * g.W;
    if (S == 1) {
      const int64_t left = g.pl < p.Wps ? g.pl : p.Wps;
      const int64_t n = g.W < p.Wps - left ? g.W : p.Wps - left;
      std::memset(row, 0, sizeof(float) * left);
      std::memcpy(row + left, src, sizeof(float) * n);
      std::memset(row + left + n, 0, sizeof(float) * (p.Wps - left - n));
    } else {
      pad_row_s2(g, p, src, row, row + p.phase);
    }
  }
}

// The fused pre-activation: a per-channel affine (an inference BatchNormalization) then Relu.
void scale_shift_relu(const float* __restrict x, float* __restrict y, int64_t n, float s, float t) {
  const vf vs = bcast(s), vt = bcast(t), zero = vf{};
  int64_t i = 0;
  for (; i + VL <= n; i += VL) {
    vf v = loadu(x + i) * vs + vt;
    storeu(y + i, v < zero ? zero : v);
  }
  for (; i < n; ++i) {
    const float v = x[i] * s + t;
    y[i] = v < 0.0f ? 0.0f : v;
  }
}

// One output value through the fused epilogue: + z[i] (z may be nullptr), then the clamp, NaN kept
// (the scalar edges of the vector epilogues).
inline float epilogue_one(float v, const float* z, int64_t i, const Epilogue& e) {
  if (z != nullptr) v += z[i];
  if (e.clamp) v = v < e.lo ? e.lo : (v > e.hi ? e.hi : v);
  return v;
}

// Output vector v of NV at pixel p: + z, the clamp, then the store (the last vector holds only
// `tail` pixels when PARTIAL; m: its lanes).
template <int NV, bool PARTIAL>
__attribute__((always_inline)) inline void pw_out(float* __restrict y, const float* __restrict z, int64_t p, int v,
                                                  vf r, int64_t tail, uint32_t m, const Epilogue& e, vf vlo, vf vhi) {
  (void)m;
  if (z != nullptr) {
#if SPARSIFY_MASKED
    if (PARTIAL && v == NV - 1) r += load_mask(z + p + v * VL, m);
    else
#endif
      r += loadu(z + p + v * VL);
  }
  if (e.clamp) {
    r = r < vlo ? vlo : r;
    r = r > vhi ? vhi : r;
  }
  if (PARTIAL && v == NV - 1) store_first(y + p + v * VL, r, tail);
#if SPARSIFY_VBYTES == 64 && defined(__AVX512F__)
  else if (e.stream) _mm512_stream_ps(y + p + v * VL, __m512(r));
#endif
  else storeu(y + p + v * VL, r);
}

// 1x1 convs: y = bias + sum_k w[k] * x[cols[k]] over the flat plane (strided 1x1 convs read an
// input the op subsampled first). NV vectors of the plane at a time; NS accumulator sets take
// alternate connections so that about eight independent FMA chains are in flight (one accumulator
// per vector was latency-bound on small planes). PARTIAL: the last vector holds `tail` floats
// (masked loads and stores on the AVX-512 units; other ISAs never pass it). The epilogue (sum input z,
// clamp) runs on the accumulators before the one store.
template <int NV, int NS, bool PARTIAL>
void pw_vectors(const float* __restrict xg, int64_t xs, int64_t px, float* __restrict y, const float* __restrict w_row,
                const int64_t* __restrict cols, int64_t cnt, float bias, int64_t p,
                int64_t tail, const Epilogue& e, const float* __restrict z) {
  vf acc[NS][NV];
#pragma GCC unroll 8
  for (int s = 0; s < NS; ++s)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[s][v] = s == 0 ? bcast(bias) : vf{};
  const uint32_t m = PARTIAL ? (1u << tail) - 1u : ~0u;
  auto one = [&](vf (&a)[NV], int64_t k) __attribute__((always_inline)) {
    const vf w = bcast(w_row[k]);
    const float* src = xg + cols[k] * xs + px;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
#if SPARSIFY_MASKED
      if (PARTIAL && v == NV - 1) {
        a[v] += w * load_mask(src + v * VL, m);
        continue;
      }
#endif
      a[v] += w * loadu(src + v * VL);
    }
  };
  over_connections<NS>(cnt, [&](int s, int64_t k) __attribute__((always_inline)) { one(acc[s], k); });
#pragma GCC unroll 8
  for (int s = 1; s < NS; ++s)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[0][v] += acc[s][v];
  const vf vlo = bcast(e.lo), vhi = bcast(e.hi);
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) pw_out<NV, PARTIAL>(y, z, p, v, acc[0][v], tail, m, e, vlo, vhi);
}

// kFanInBlock output channels that read the same input channels (a block of output channels sharing
// one fan-in, as the transform's `block` option draws them): each loaded input vector feeds
// kFanInBlock FMAs instead of one, so the loads from the L2-resident tile stop bounding the FMA rate
// (1x1 256->64 on 56x56 at density 0.1: 1.55 -> 3.3 G 16-float FMA/s, of a 3.7 G peak). y[r],
// w[r], z[r], bias[r]: output channel r of the block; cols: the shared input channels.
static_assert(kFanInBlock == 4, "pw_block_vectors names its four weight rows");
template <int NV, bool PARTIAL>
void pw_block_vectors(const float* __restrict xg, int64_t xs, int64_t px, float* const* y, const float* const* w,
                      const int64_t* __restrict cols, int64_t cnt, const float* bias, int64_t p, int64_t tail,
                      const Epilogue& e, const float* const* z) {
  vf acc[kFanInBlock][NV];
#pragma GCC unroll 8
  for (int r = 0; r < kFanInBlock; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = bcast(bias[r]);
  const uint32_t m = PARTIAL ? (1u << tail) - 1u : ~0u;
  const float* w0 = w[0];
  const float* w1 = w[1];
  const float* w2 = w[2];
  const float* w3 = w[3];
  for (int64_t k = 0; k < cnt; ++k) {
    const float* src = xg + cols[k] * xs + px;
    vf xv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
#if SPARSIFY_MASKED
      if (PARTIAL && v == NV - 1) {
        xv[v] = load_mask(src + v * VL, m);
        continue;
      }
#endif
      xv[v] = loadu(src + v * VL);
    }
    const vf wk[kFanInBlock] = {bcast(w0[k]), bcast(w1[k]), bcast(w2[k]), bcast(w3[k])};
#pragma GCC unroll 8
    for (int r = 0; r < kFanInBlock; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += wk[r] * xv[v];
  }
  const vf vlo = bcast(e.lo), vhi = bcast(e.hi);
#pragma GCC unroll 8
  for (int r = 0; r < kFanInBlock; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) pw_out<NV, PARTIAL>(y[r], z[r], p, v, acc[r][v], tail, m, e, vlo, vhi);
}

// The shared-fan-in unit with the plane's last TAIL (< VL) pixels carried across the block
// instead of along the plane: wi holds the block's weights interleaved ([k][r], built once by the
// op for constant weights), and one 4-float accumulator per tail pixel takes w4[k] * x[tail pixel]
// for the four channels at once. A 7x7 plane (49 = 3 x 16 + 1) is then one pass of 12 16-float
// FMAs plus one 4-float FMA per connection, where a masked fourth vector cost 16 (1x1 512->2048
// on 7x7 at density 0.5, standalone: 38.7 -> 57 G multiply-adds/s, the FMA peak).
typedef float v4 __attribute__((vector_size(16)));
typedef float v4u __attribute__((vector_size(16), aligned(4), may_alias));
template <int NV, int TAIL>
void pw_block_tail(const float* __restrict xg, int64_t xs, int64_t px, float* const* y, const float* __restrict wi,
                   const int64_t* __restrict cols, int64_t cnt, const float* bias, int64_t p, const Epilogue& e,
                   const float* const* z) {
  vf acc[kFanInBlock][NV];
#pragma GCC unroll 8
  for (int r = 0; r < kFanInBlock; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = bcast(bias[r]);
  v4 at[TAIL];
#pragma GCC unroll 4
  for (int j = 0; j < TAIL; ++j) at[j] = v4{bias[0], bias[1], bias[2], bias[3]};
  for (int64_t k = 0; k < cnt; ++k, wi += kFanInBlock) {
    const float* src = xg + cols[k] * xs + px;
    vf xv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) xv[v] = load_once(src + v * VL);
#pragma GCC unroll 4
    for (int r = 0; r < kFanInBlock; ++r) {
      const vf wk = bcast(wi[r]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += wk * xv[v];
    }
    const v4 w4 = *reinterpret_cast<const v4u*>(wi);
#pragma GCC unroll 4
    for (int j = 0; j < TAIL; ++j) at[j] += w4 * (src[NV * VL + j] - v4{});
  }
  const vf vlo = bcast(e.lo), vhi = bcast(e.hi);
#pragma GCC unroll 8
  for (int r = 0; r < kFanInBlock; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) pw_out<NV, false>(y[r], z[r], p, v, acc[r][v], 0, ~0u, e, vlo, vhi);
  for (int j = 0; j < TAIL; ++j)
    for (int r = 0; r < kFanInBlock; ++r) {
      const int64_t q = p + NV * VL + j;
      y[r][q] = epilogue_one(at[j][r], z[r], q, e);
    }
}

template <int NV>
void pw_block_tail_n(const float* xg, int64_t xs, int64_t px, float* const* y, const float* wi, const int64_t* cols,
                     int64_t cnt, const float* bias, int64_t p, int64_t tail, const Epilogue& e, const float* const* z) {
  switch (tail) {
    case 1: return pw_block_tail<NV, 1>(xg, xs, px, y, wi, cols, cnt, bias, p, e, z);
    case 2: return pw_block_tail<NV, 2>(xg, xs, px, y, wi, cols, cnt, bias, p, e, z);
    case 3: return pw_block_tail<NV, 3>(xg, xs, px, y, wi, cols, cnt, bias, p, e, z);
    default: return pw_block_tail<NV, 4>(xg, xs, px, y, wi, cols, cnt, bias, p, e, z);
  }
}

template <bool PARTIAL>
void pw_rest(const float* xg, int64_t xs, int64_t px, float* y, const float* w_row, const int64_t* cols,
             int64_t cnt, float bias, int64_t p, int64_t nv, int64_t tail, const Epilogue& e, const float* z) {
  switch (nv) {
    case 1: return pw_vectors<1, 8, PARTIAL>(xg, xs, px, y, w_row, cols, cnt, bias, p, tail, e, z);
    case 2: return pw_vectors<2, 4, PARTIAL>(xg, xs, px, y, w_row, cols, cnt, bias, p, tail, e, z);
    case 3: return pw_vectors<3, 3, PARTIAL>(xg, xs, px, y, w_row, cols, cnt, bias, p, tail, e, z);
    case 4: return pw_vectors<4, 2, PARTIAL>(xg, xs, px, y, w_row, cols, cnt, bias, p, tail, e, z);
    case 5: return pw_vectors<5, 2, PARTIAL>(xg, xs, px, y, w_row, cols, cnt, bias, p, tail, e, z);
    case 6: return pw_vectors<6, 1, PARTIAL>(xg, xs, px, y, w_row, cols, cnt, bias, p, tail, e, z);
    case 7: return pw_vectors<7, 1, PARTIAL>(xg, xs, px, y, w_row, cols, cnt, bias, p, tail, e, z);
    default: return pw_vectors<8, 1, PARTIAL>(xg, xs, px, y, w_row, cols, cnt, bias, p, tail, e, z);
  }
}

// Pixels [p0, p1) of one output channel (p0 a multiple of VL); pixel p of input channel c is at
// xg[c * xs + p - xoff].
void pw_range(const float* xg, int64_t xs, int64_t xoff, float* y, const float* w_row, const int64_t* cols,
              int64_t cnt, float bias, int64_t p0, int64_t p1, const Epilogue& e, const float* z) {
  int64_t p = p0;
  for (; p + 8 * VL <= p1; p += 8 * VL)
    pw_vectors<8, 1, false>(xg, xs, p - xoff, y, w_row, cols, cnt, bias, p, 0, e, z);
  const int64_t nv = (p1 - p) / VL, tail = (p1 - p) % VL;
#if SPARSIFY_MASKED
  if (tail > 0) return pw_rest<true>(xg, xs, p - xoff, y, w_row, cols, cnt, bias, p, nv + 1, tail, e, z);
#endif
  if (nv > 0) pw_rest<false>(xg, xs, p - xoff, y, w_row, cols, cnt, bias, p, nv, 0, e, z);
  for (p += nv * VL; p < p1; ++p) {
    float acc = bias;
    for (int64_t k = 0; k < cnt; ++k) acc += w_row[k] * xg[cols[k] * xs + p - xoff];
    y[p] = epilogue_one(acc, z, p, e);
  }
}

template <bool PARTIAL>
void pw_block_rest(const float* xg, int64_t xs, int64_t px, float* const* y, const float* const* w,
                   const int64_t* cols, int64_t cnt, const float* bias, int64_t p, int64_t nv, int64_t tail,
                   const Epilogue& e, const float* const* z) {
  switch (nv) {
    case 1: return pw_block_vectors<1, PARTIAL>(xg, xs, px, y, w, cols, cnt, bias, p, tail, e, z);
    case 2: return pw_block_vectors<2, PARTIAL>(xg, xs, px, y, w, cols, cnt, bias, p, tail, e, z);
#if SPARSIFY_NREGS >= 32
    case 3: return pw_block_vectors<3, PARTIAL>(xg, xs, px, y, w, cols, cnt, bias, p, tail, e, z);
    case 4: return pw_block_vectors<4, PARTIAL>(xg, xs, px, y, w, cols, cnt, bias, p, tail, e, z);
#endif
  }
}

// pw_range for a block of kFanInBlock output channels sharing cols: kFanInBlockNV vectors of pixels at
// a time (kFanInBlock x kFanInBlockNV accumulators: 16 of 32 registers, 8 of 16 on AVX2).
constexpr int64_t kFanInBlockNV = SPARSIFY_NREGS >= 32 ? 4 : 2;
void pw_block_range(const float* xg, int64_t xs, int64_t xoff, float* const* y, const float* const* w,
                    const float* wi, const int64_t* cols, int64_t cnt, const float* bias, int64_t p0, int64_t p1,
                    const Epilogue& e, const float* const* z) {
  int64_t p = p0;
  const int64_t full = (p1 - p0) / VL, left = (p1 - p0) % VL;
  if (wi != nullptr && full > 0 && left > 0 && left <= kMaxTailPixels) {
    // The tail rides along with the last pass of 1 .. kFanInBlockNV vectors.
    const int64_t last = full % kFanInBlockNV == 0 ? kFanInBlockNV : full % kFanInBlockNV;
    for (; p + (last + 1) * VL <= p1; p += kFanInBlockNV * VL)
      pw_block_vectors<kFanInBlockNV, false>(xg, xs, p - xoff, y, w, cols, cnt, bias, p, 0, e, z);
    switch (last) {
      case 1: return pw_block_tail_n<1>(xg, xs, p - xoff, y, wi, cols, cnt, bias, p, left, e, z);
#if SPARSIFY_NREGS >= 32
      case 2: return pw_block_tail_n<2>(xg, xs, p - xoff, y, wi, cols, cnt, bias, p, left, e, z);
      case 3: return pw_block_tail_n<3>(xg, xs, p - xoff, y, wi, cols, cnt, bias, p, left, e, z);
      case 4: return pw_block_tail_n<4>(xg, xs, p - xoff, y, wi, cols, cnt, bias, p, left, e, z);
#else
      default: return pw_block_tail_n<2>(xg, xs, p - xoff, y, wi, cols, cnt, bias, p, left, e, z);
#endif
    }
  }
  for (; p + kFanInBlockNV * VL <= p1; p += kFanInBlockNV * VL)
    pw_block_vectors<kFanInBlockNV, false>(xg, xs, p - xoff, y, w, cols, cnt, bias, p, 0, e, z);
  const int64_t nv = (p1 - p) / VL, tail = (p1 - p) % VL;
#if SPARSIFY_MASKED
  if (tail > 0) return pw_block_rest<true>(xg, xs, p - xoff, y, w, cols, cnt, bias, p, nv + 1, tail, e, z);
#endif
  if (nv > 0) pw_block_rest<false>(xg, xs, p - xoff, y, w, cols, cnt, bias, p, nv, 0, e, z);
  // Fewer pixels than a vector left (ISAs without masked loads): pw_range's scalar tail per channel.
  if (p + nv * VL < p1)
    for (int r = 0; r < kFanInBlock; ++r) pw_range(xg, xs, xoff, y[r], w[r], cols, cnt, bias[r], p + nv * VL, p1, e, z[r]);
}

// Output channels [o0, o1) over pixels [p0, p1) of one image, tile by tile: every output channel
// reads the tile's pixels of its input channels, so a tile of all input channels stays in cache
// while all output channels stream their connections over it (walking whole planes output channel
// by output channel streamed the whole input from L3 for each one: 1x1 256->64 on 56x56 ran at
// 4x of ORT's Conv at density 0.1).
void pointwise_block(const PwArgs& a, int64_t o0, int64_t o1, int64_t p0, int64_t p1) {
  const int64_t HW = a.HW;
  // Streaming stores need every output vector 64-byte aligned: rows of whole vectors.
  Epilogue e = a.e;
  e.stream = e.stream && VL == 16 && HW % VL == 0 && reinterpret_cast<uintptr_t>(a.y) % 64 == 0;
  const int64_t groups = a.cout_per_group > 0 ? (o1 - 1) / a.cout_per_group - o0 / a.cout_per_group + 1 : 1;
  const int64_t span = groups * a.cin_per_group, nout = o1 - o0;
  const int64_t cbase = (o0 / (a.cout_per_group > 0 ? a.cout_per_group : 1)) * a.cin_per_group;  // first input channel read
  const float* xbase = a.x + cbase * HW;
  for (int64_t t = p0; t < p1; t += a.tile) {
    const int64_t t1 = t + a.tile < p1 ? t + a.tile : p1;
    // The next tile's input rows are fetched into L2 while this tile computes, a few rows per
    // output channel: a tile's rows are as many separate streams as input channels, too many
    // for the hardware prefetchers when the input comes from memory (batch 8 on 56x56 planes).
    const int64_t n1 = t1 + a.tile < p1 ? a.tile : p1 - t1;
    // With the fused pre-activation the tile's rows of the input channels this block reads are
    // first written, as Relu(x * S + T), into a buffer of rows of `tile` floats (in cache); without
    // one (rows that do not start on a vector boundary), as they are.
    if (a.pack != nullptr) {
      for (int64_t c = 0; c < span; ++c) {
        const float* row = (a.xc != nullptr ? a.xc[cbase + c] : xbase + c * HW) + t;
        if (a.S != nullptr)
          scale_shift_relu(row, a.pack + c * a.pack_stride, t1 - t, a.S[cbase + c], a.T[cbase + c]);
        else
          memcpy(a.pack + c * a.pack_stride, row, size_t(t1 - t) * sizeof(float));
      }
    }
    for (int64_t o = o0, oe; o < o1; o = oe) {
      const bool block = a.same != nullptr && a.same[o] >= kFanInBlock && o + kFanInBlock <= o1;
      oe = o + (block ? kFanInBlock : 1);
      if (n1 > 0) {
        const int64_t c0 = (o - o0) * span / nout, c1 = (oe - o0) * span / nout;
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t q = 0; q < n1; q += 16)
            __builtin_prefetch((a.xc != nullptr ? a.xc[c + cbase] : xbase + c * HW) + t1 + q, 0, 2);
      }
      const int64_t s = a.row_ptr[o], cnt = a.row_ptr[o + 1] - s;
      const int64_t cg = (o / a.cout_per_group) * a.cin_per_group;
      const float* xg = a.pack != nullptr ? a.pack + (cg - cbase) * a.pack_stride : a.x + cg * HW;
      const int64_t xs = a.pack != nullptr ? a.pack_stride : HW, xoff = a.pack != nullptr ? t : 0;
      if (block) {
        float* y[kFanInBlock];
        const float* w[kFanInBlock];
        const float* z[kFanInBlock];
        float bias[kFanInBlock];
        for (int r = 0; r < kFanInBlock; ++r) {
          y[r] = a.y + (o + r) * HW;
          w[r] = a.w + a.row_ptr[o + r];
          z[r] = a.z != nullptr ? a.z + (o + r) * HW : nullptr;
          bias[r] = a.bias != nullptr ? a.bias[o + r] : 0.0f;
        }
        pw_block_range(xg, xs, xoff, y, w, a.wi != nullptr ? a.wi + s : nullptr, a.col_idx + s, cnt, bias, t, t1, e, z);
      } else {
        pw_range(xg, xs, xoff, a.y + o * HW, a.w + s, a.col_idx + s, cnt, a.bias != nullptr ? a.bias[o] : 0.0f, t, t1,
                 e, a.z != nullptr ? a.z + o * HW : nullptr);
      }
    }
  }
#if SPARSIFY_VBYTES == 64 && defined(__AVX512F__)
  if (e.stream) _mm_sfence();
#endif
}

// The 1x1 conv that a kxk conv is over its input's shifted copies (im2col), for C input planes:
// out[c * kH*kW + ky * kW + kx][oy][ox] = x[c][oy * sH + ky * dH - pt][ox * sW + kx * dW - pl], 0
// where that lies in a pad. A strided 1x1 conv without pads reads its subsampled input this way.
void im2col(const Geom& g, const float* __restrict x, float* __restrict out, int64_t C) {
  const int64_t hw = g.H * g.W, hwo = g.Ho * g.Wo;
#if SPARSIFY_MASKED
  // Stride 1 with rows as wide as the output's: tap t's copy is the flat plane shifted by
  // delta[t], with the lanes whose pixel reads a pad masked off, a few whole vectors per tap (7x7
  // 3x3 'same': four masked loads where rows of 7 floats took 7 copies and their edges).
  constexpr int64_t kMaxTaps = 49, kMaxVecs = 4;
  const int64_t nv = cdiv(hwo, VL), taps = g.kH * g.kW;
  if (g.sH == 1 && g.sW == 1 && g.W == g.Wo && nv <= kMaxVecs && taps <= kMaxTaps) {
    int64_t delta[kMaxTaps];
    uint32_t m[kMaxTaps][kMaxVecs];
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t dy = (t / g.kW) * g.dH - g.pt, dx = (t % g.kW) * g.dW - g.pl;
      delta[t] = dy * g.W + dx;
      // Output pixel (oy, ox) walked alongside its lane (no division per lane: this runs per task).
      int64_t oy = 0, ox = 0;
      for (int64_t v = 0; v < nv; ++v) {
        uint32_t mv = 0;
        for (int64_t l = 0; l < VL && v * VL + l < hwo; ++l) {
          const int64_t iy = oy + dy, ix = ox + dx;
          if (iy >= 0 && iy < g.H && ix >= 0 && ix < g.W) mv |= 1u << l;
          if (++ox == g.Wo) {
            ox = 0;
            ++oy;
          }
        }
        m[t][v] = mv;
      }
    }
    const uint32_t last = hwo % VL == 0 ? ~0u : (1u << (hwo % VL)) - 1u;
    for (int64_t c = 0; c < C; ++c) {
      const float* xc = x + c * hw;
      for (int64_t t = 0; t < taps; ++t, out += hwo) {
        for (int64_t v = 0; v + 1 < nv; ++v) storeu(out + v * VL, load_mask(xc + v * VL + delta[t], m[t][v]));
        store_mask(out + (nv - 1) * VL, load_mask(xc + (nv - 1) * VL + delta[t], m[t][nv - 1]), last);
      }
    }
    return;
  }
#endif
  for (int64_t c = 0; c < C; ++c) {
    const float* xc = x + c * hw;
    for (int64_t ky = 0; ky < g.kH; ++ky)
      for (int64_t kx = 0; kx < g.kW; ++kx, out += hwo) {
        // Columns ox0 .. ox1 - 1 read inside the row, the others a pad.
        const int64_t off = kx * g.dW - g.pl;
        const int64_t ox0 = off >= 0 ? 0 : (-off + g.sW - 1) / g.sW < g.Wo ? (-off + g.sW - 1) / g.sW : g.Wo;
        int64_t ox1 = g.W - off > 0 ? (g.W - off + g.sW - 1) / g.sW : 0;
        ox1 = ox1 > g.Wo ? g.Wo : (ox1 < ox0 ? ox0 : ox1);
        for (int64_t oy = 0; oy < g.Ho; ++oy) {
          float* dst = out + oy * g.Wo;
          const int64_t iy = oy * g.sH + ky * g.dH - g.pt;
          const bool inside = iy >= 0 && iy < g.H;
          const int64_t a = inside ? ox0 : g.Wo, b = inside ? ox1 : g.Wo;
          for (int64_t ox = 0; ox < a; ++ox) dst[ox] = 0.0f;
          for (int64_t ox = b; ox < g.Wo; ++ox) dst[ox] = 0.0f;
          if (!inside) continue;
          const float* src = xc + iy * g.W + off;
          int64_t ox = a;
          if (g.sW == 1) {
            for (; ox + VL <= b; ox += VL) storeu(dst + ox, loadu(src + ox));
#if SPARSIFY_MASKED
            if (ox < b) {
              const uint32_t m = (1u << (b - ox)) - 1u;
              store_mask(dst + ox, load_mask(src + ox, m), m);
              ox = b;
            }
#endif
          }
#if SPARSIFY_VBYTES == 64 && defined(__AVX512F__)
          if (g.sW == 2) {
            const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            for (; ox + VL <= b && off + 2 * ox + 2 * VL <= g.W; ox += VL)
              _mm512_storeu_ps(dst + ox, _mm512_permutex2var_ps(_mm512_loadu_ps(src + 2 * ox), even,
                                                                _mm512_loadu_ps(src + 2 * ox + VL)));
            // The row's last columns (28 of a 56-wide row: 12 after one whole vector): masked loads of
            // the 2r - 1 floats they read, never past the row.
            for (; ox < b; ox += VL) {
              const int64_t r = b - ox < VL ? b - ox : VL, n = 2 * r - 1;
              const uint32_t lo = n >= VL ? 0xffffu : (1u << n) - 1u, hi = n > VL ? (1u << (n - VL)) - 1u : 0u;
              _mm512_mask_storeu_ps(dst + ox, __mmask16((1u << r) - 1u),
                                    _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(__mmask16(lo), src + 2 * ox), even,
                                                           _mm512_maskz_loadu_ps(__mmask16(hi), src + 2 * ox + VL)));
            }
          }
#endif
          for (; ox < b; ++ox) dst[ox] = src[ox * g.sW];
        }
      }
  }
}

void generic_channel(const Geom& g, const Plan& p, const float* __restrict xp_n,
                     float* __restrict y, const float* __restrict w_row,
                     const int64_t* __restrict cols, int64_t cnt, float bias, int64_t cin_base) {
  const int64_t kk = g.kH * g.kW;
  for (int64_t oy = 0; oy < g.Ho; ++oy) {
    float* out = y + oy * g.Wo;
    for (int64_t ox = 0; ox < g.Wo; ++ox) out[ox] = bias;
    for (int64_t k = 0; k < cnt; ++k) {
      const float* xc = xp_n + (cin_base + cols[k]) * p.plane;
      const float* w = w_row + k * kk;
      for (int64_t ky = 0; ky < g.kH; ++ky) {
        const float* row = xc + (oy * g.sH + ky * g.dH) * p.Wps;
        for (int64_t kx = 0; kx < g.kW; ++kx) {
          const float wt = w[ky * g.kW + kx];
          const float* r = row + kx * g.dW;
          if (g.sW == 1) {
            for (int64_t ox = 0; ox < g.Wo; ++ox) out[ox] += wt * r[ox];
          } else {
            for (int64_t ox = 0; ox < g.Wo; ++ox) out[ox] += wt * r[ox * g.sW];
          }
        }
      }
    }
  }
}

void compute_channel(const Geom& g, const Plan& p, const float* x_n, const float* xp_n, float* y,
                     const float* w_row, const int64_t* cols, int64_t cnt, float bias,
                     int64_t cin_base, int64_t row0, int64_t row1) {
  if (p.kind == kTiny2) {
    tiny2_channel(x_n, y, w_row, cols, cnt, bias, cin_base);
  } else if (p.kind == kSmall3) {
    small_channel(g, p, x_n, y, w_row, cols, cnt, bias, cin_base);
  } else if (p.kind == kDepthwise) {
    dw_plane(g, p, x_n, y, w_row, cols, cnt, bias, cin_base);
  } else if (p.kind == kFlat3) {
    (p.align ? kFlatCfgs[p.cfg].fn_align : kFlatCfgs[p.cfg].fn)(g, p, xp_n, y, w_row, cols, cnt, bias, cin_base, row0, row1);
  } else if (p.kind == kDirect) {
    kCfgs[p.cfg].fn(g, p, xp_n, y, w_row, cols, cnt, bias, cin_base, row0, row1);
  } else {
    generic_channel(g, p, xp_n, y, w_row, cols, cnt, bias, cin_base);
  }
}

// compute_channel for kFanInBlock output channels that list the same input channels (cols): true
// when the plan has a block unit (kDirect 3x3 stride 2), else false and nothing is written.
bool compute_block(const Geom& g, const Plan& p, const float* xp_n, float* const* ys, const float* const* w_rows,
                   const int64_t* cols, int64_t cnt, const float* bias, int64_t cin_base, int64_t row0,
                   int64_t row1) {
  if (p.kind != kDirect || p.bcfg < 0) return false;
  kBlockCfgs[p.bcfg].fn(g, p, xp_n, ys, w_rows, cols, cnt, bias, cin_base, row0, row1);
  return true;
}

// The fused epilogue on output just written (in cache): + z (the fused residual input), then the
// activation's clamp. Vector compares keep NaN as ONNX Relu / Clip do. (A 4-wide pass in the op's
// baseline code made a fused Clip slower than ORT's own Clip node.)
void epilogue(float* __restrict y, const float* __restrict z, int64_t n, const Epilogue& e) {
  const vf vlo = bcast(e.lo), vhi = bcast(e.hi);
  int64_t i = 0;
  for (; i + VL <= n; i += VL) {
    vf v = loadu(y + i);
    if (z != nullptr) v += loadu(z + i);
    if (e.clamp) {
      v = v < vlo ? vlo : v;
      v = v > vhi ? vhi : v;
    }
    storeu(y + i, v);
  }
  for (; i < n; ++i) y[i] = epilogue_one(y[i], z, i, e);
}

// ---------------------------------------------------------------------------------------------
// Max pool after the conv (a fused MaxPool: the stem's 3x3/s2 in ResNets and DenseNets).

// Floats of the row buffers below; wider rows take the scalar loop.
constexpr int64_t kPoolRow = 4096;

// One plane of ONNX MaxPool (ceil_mode 0, dilations 1): y [Ho, Wo] from x [H, W], windows kh x kw
// at strides sh, sw, top / left pads pt, pl (padding never wins). Each output row takes the
// elementwise max of its window's input rows (vectors), then the max over kw columns at stride sw
// of that row, read from a copy with -inf in the pads (split into even and odd columns for sw = 2,
// so that every tap is one vector load). ORT ran the stem's pool in its blocked layout, behind a
// reorder of the SparseConv's whole output.
void max_pool_plane(const float* __restrict x, float* __restrict y, int64_t H, int64_t W, int64_t Ho,
                    int64_t Wo, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  const float ninf = -__builtin_inff();
  const int64_t wpad = (Wo - 1) * sw + kw;  // padded columns the windows read
  if ((sw != 1 && sw != 2) || wpad + pl + W + 4 * VL > kPoolRow) {
    for (int64_t q = 0; q < Ho; ++q)
      for (int64_t c = 0; c < Wo; ++c) {
        float m = ninf;
        for (int64_t r = q * sh - pt; r < q * sh - pt + kh; ++r)
          for (int64_t i = c * sw - pl; i < c * sw - pl + kw; ++i)
            if (r >= 0 && r < H && i >= 0 && i < W && !(x[r * W + i] <= m)) m = x[r * W + i];
        y[q * Wo + c] = m;
      }
    return;
  }
  alignas(64) float vb[kPoolRow];
  alignas(64) float ph[2][kPoolRow / 2];
  const int64_t filled = wpad + 2 * VL > pl + W ? wpad + 2 * VL : pl + W;  // vb columns written
  for (int64_t c = 0; c < pl; ++c) vb[c] = ninf;
  for (int64_t c = pl + W; c < filled + 2 * VL; ++c) vb[c] = ninf;
  for (int64_t q = 0; q < Ho; ++q) {
    const int64_t r0 = q * sh - pt > 0 ? q * sh - pt : 0;
    const int64_t r1 = q * sh - pt + kh < H ? q * sh - pt + kh : H;
    float* row = vb + pl;
    int64_t c = 0;
    for (; c + VL <= W; c += VL) {
      vf m = loadu(x + r0 * W + c);
      for (int64_t r = r0 + 1; r < r1; ++r) {
        const vf v = loadu(x + r * W + c);
        m = v > m ? v : m;
      }
      storeu(row + c, m);
    }
    for (; c < W; ++c) {
      float m = x[r0 * W + c];
      for (int64_t r = r0 + 1; r < r1; ++r) m = x[r * W + c] > m ? x[r * W + c] : m;
      row[c] = m;
    }
    const float* src[2] = {vb, vb};
    if (sw == 2) {
      for (int64_t i = 0; 2 * i < filled; i += VL) {
        const vf a = loadu(vb + 2 * i), b = loadu(vb + 2 * i + VL);
        storeu(ph[0] + i, __builtin_shuffle(a, b, kEven));
        storeu(ph[1] + i, __builtin_shuffle(a, b, kEven + 1));
      }
      src[0] = ph[0], src[1] = ph[1];
    }
    float* out = y + q * Wo;
    for (int64_t o = 0; o < Wo; o += VL) {
      // Tap t of output column o + lane reads padded column sw * (o + lane) + t.
      vf m = loadu(src[0] + o);
      for (int64_t t = 1; t < kw; ++t) {
        const vf v = sw == 2 ? loadu(src[t % 2] + o + t / 2) : loadu(vb + o + t);
        m = v > m ? v : m;
      }
      if (o + VL <= Wo) storeu(out + o, m);
      else store_first(out + o, m, Wo - o);
    }
  }
}

const KernelFns kFns = {SPARSIFY_ISA_NAME, &make_plan,       &pad_channel, &compute_channel, kCscBlock,
                        &epilogue,        &pointwise_block, &im2col,   &scale_shift_relu, &compute_block,
                        &max_pool_plane};

}  // namespace
}  // namespace SPARSIFY_ISA_NS

const KernelFns* SPARSIFY_ENTRY() { return &SPARSIFY_ISA_NS::kFns; }

}  // namespace sparsify_conv
