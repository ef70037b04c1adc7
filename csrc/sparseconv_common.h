// Shared plain-data types between the op glue (sparseconv_op.cc) and the per-ISA kernels
// (sparseconv_base.cc, sparseconv_avx2.cc). Only POD structs and function prototypes live here:
// the kernel translation units are compiled with different -m flags, so nothing inline may be
// shared between them (an inline function instantiated in the AVX2 unit could be picked by the
// linker for the baseline path and crash on a CPU without AVX2).
#pragma once

#include <cstdint>

namespace sparsify_conv {

// Geometry of one SparseConv call (ONNX Conv semantics, NCHW, fp32).
struct Geom {
  int64_t N, Cin, H, W;          // input
  int64_t Cout, Ho, Wo;          // output
  int64_t kH, kW;                // kernel
  int64_t sH, sW, dH, dW;        // strides, dilations
  int64_t pt, pl, pb, pr;        // pads (top, left, bottom, right)
  int64_t group, cin_per_group, cout_per_group;
};

// How a kernel computes: chosen per call by the ISA's make_plan().
enum PlanKind : int32_t {
  kPointwise = 0,  // 1x1, no pads: reads X (or its subsampled copy for strides > 1), no padded copy
  kDirect = 1,     // kxk (k in 1,3,5,7), stride 1 or 2, dilation 1: register-blocked, padded copy
  kGeneric = 2,    // anything else: simple loops over a padded copy
  kFlat3 = 3,      // 3x3, stride 1, dilation 1: output plane as flat vectors (see kernel.h)
  kSmall3 = 4,     // 3x3 "same" conv on a plane of at most 4 AVX-512 vectors: rotations, no copy
  kTiny2 = 5,      // 3x3 "same" conv on a 2x2 plane (AVX-512): a connection is one 16-lane FMA
  kDepthwise = 6,  // 3x3 / 5x5, stride 1 or 2, one input channel per output (AVX-512): masked loads, no copy
};

struct Plan {
  int32_t kind;
  int32_t reads_x;      // 1: computes from X directly (no padded copy): kPointwise, kSmall3, kTiny2, kDepthwise
  int32_t K, S;         // square kernel size and stride of the direct path
  int32_t R, V;         // register block: R output rows x V vectors
  int32_t VL;           // floats per vector of this ISA
  int32_t cfg;          // index of the direct path's register-block instantiation
  int32_t bcfg;         // kDirect: its block unit for kFanInBlock channels sharing a fan-in (-1: none)
  int64_t Hp, Wps;      // padded rows, padded row stride (floats, per phase)
  int64_t phase;        // floats between column phases (stride-2 layout), 0 when S == 1
  int64_t plane;        // floats per padded input channel (all phases)
  // kFlat3 only: P output rows per vector (1, or VL/ws for narrow planes), ws floats per flat
  // output row, nvr vectors per output row (P == 1), kxs floats between the kx-shifted input
  // copies (1 when a single padded copy is read at kx offsets). kFlat3 and kDirect: strip output
  // rows per cache tile.
  int32_t P, nvr;
  int32_t align;  // rows of exactly ws floats, unshifted; kx shifts by lane rotation (AVX-512)
  int64_t ws, kxs, strip;
  // kSmall3 only: per kx the lanes whose source column is inside the plane.
  uint32_t smask[3];
};

// The live connections of a block of output channels [o_begin, o_end), grouped by input
// channel (compressed sparse columns): column c is input channel chan[c] (absolute, groups
// resolved) and holds entries [start[c], start[c + 1]); entry q adds w[9q .. 9q + 9) (3x3) from
// that channel into output channel out[q].
struct CscBlock {
  int64_t o_begin, o_end, ncols;
  const int64_t* chan;
  const int64_t* start;
  const int64_t* out;
  const float* w;
};

// What happens to an output vector after its convolution sum: + z (the fused residual input, same
// shape and offsets as the output; nullptr: none), then clamped to [lo, hi] when clamp is set.
// stream: the output may be written with non-temporal stores (it is too large to stay in cache
// for the next layer; the kernel uses them only where its rows are aligned vectors).
struct Epilogue {
  float lo, hi;
  int32_t clamp;
  int32_t stream;
};

// One image's 1x1 convolution for pointwise_block: x [Cin, HW] (already subsampled when
// strided), y and z [Cout, HW]; CSR connections over output channels; pixel tiles of `tile`
// floats (a multiple of the vector length).
// With S and T (the fused pre-activation, [Cin]) the kernel first writes each tile's rows of the
// input channels it reads, as Relu(x * S + T), into `pack` (rows of `tile` floats, one per input
// channel of the block's groups); with `pack` but no S, it copies them there as they are (rows
// aligned to whole vectors).
struct PwArgs {
  const float* x;
  float* y;
  const float* z;
  const float* w;
  const int64_t* row_ptr;
  const int64_t* col_idx;
  const float* bias;
  int64_t HW, cin_per_group, cout_per_group, tile;
  Epilogue e;
  const float* S;
  const float* T;
  float* pack;
  // Floats from one packed row to the next: the tile, or the plane rounded up to whole vectors.
  int64_t pack_stride;
  // same[o]: how many output channels from o on (o included, up to kFanInBlock, within o's group)
  // read exactly o's input channels; nullptr: not computed (every channel on its own).
  const int32_t* same;
  // The weights with every shared-fan-in block's rows interleaved (entry k of its channel r at
  // row_ptr[o] + 4 * k + r, o the block's first channel; other channels as in w); nullptr: none.
  const float* wi;
  // The input as separate pieces (SparseConvPre over a channel Concat): xc[c] is input channel c's
  // plane of this image; nullptr: channel c at x + c * HW. Only read with a pre-activation (pack).
  const float* const* xc;
};

// Output channels per block of the shared-fan-in units (pointwise_block, compute_block): runs of
// channels that list the same input channels, computed together so that each loaded input vector
// feeds kFanInBlock FMAs.
constexpr int kFanInBlock = 4;
// 1x1 planes that leave at most this many pixels over a whole number of vectors carry them across
// each shared-fan-in block (pointwise_block with PwArgs::wi); more take a masked vector.
constexpr int64_t kMaxTailPixels = 4;

// One ISA's entry points. make_plan fills a Plan; pad_channel writes one input channel's padded
// copy (layout described by the plan); compute_channel writes output rows [row0, row1) of one
// output channel's plane (row ranges other than the whole plane only for kFlat3 and kDirect, at
// multiples of p.strip).
struct KernelFns {
  const char* isa;
  void (*make_plan)(const Geom& g, Plan* p);
  void (*pad_channel)(const Geom& g, const Plan& p, const float* x_chan, float* xp_chan);
  void (*compute_channel)(const Geom& g, const Plan& p, const float* x_n, const float* xp_n,
                          float* y_chan, const float* w_row, const int64_t* cols, int64_t cnt,
                          float bias, int64_t cin_base, int64_t row0, int64_t row1);
  // kSmall3 plans whose plane is whole vectors (H * W a multiple of VL), or nullptr where the ISA
  // has no such path: one block of output channels of one image, input channel by input channel
  // (see csc3_block in kernel.h).
  void (*csc_block)(const Geom& g, const Plan& p, const float* x_n, float* y_n, const float* bias,
                    const CscBlock& b);
  // y[i] = y[i] + z[i] (z may be nullptr: no sum), then min(max(y[i], lo), hi) when e.clamp,
  // over n floats, NaN kept (the fused residual Add and Relu / Clip).
  void (*epilogue)(float* y, const float* z, int64_t n, const Epilogue& e);
  // 1x1 convs: output channels [o0, o1) over pixels [p0, p1) (p0 a multiple of the tile).
  void (*pointwise_block)(const PwArgs& a, int64_t o0, int64_t o1, int64_t p0, int64_t p1);
  // out [C * kH * kW, Ho, Wo]: the shifted copies of C input planes x [C, H, W] that the conv of
  // geometry g reads (im2col; zeros in the pads); for a strided 1x1 conv its subsampled input.
  void (*im2col)(const Geom& g, const float* x, float* out, int64_t C);
  // y[i] = max(x[i] * s + t, 0) over n floats, NaN kept (the fused input BatchNormalization + Relu).
  void (*scale_shift_relu)(const float* x, float* y, int64_t n, float s, float t);
  // compute_channel for kFanInBlock output channels that read the same input channels (cols), y[b]
  // w_rows[b], bias[b] channel b's; false (nothing written) when the plan has no block unit.
  bool (*compute_block)(const Geom& g, const Plan& p, const float* xp_n, float* const* y, const float* const* w_rows,
                        const int64_t* cols, int64_t cnt, const float* bias, int64_t cin_base, int64_t row0,
                        int64_t row1);
  // One plane of a 2-D max pool (ONNX MaxPool, ceil_mode 0, dilations 1): y [Ho, Wo] from
  // x [H, W], windows kh x kw at strides sh, sw, top / left pads pt, pl.
  void (*max_pool_plane)(const float* x, float* y, int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t kh,
                         int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pl);
};

const KernelFns* base_kernels();
#if defined(__x86_64__) || defined(_M_X64)
const KernelFns* avx2_kernels();
const KernelFns* avx512_kernels();
const KernelFns* avx512y_kernels();
#endif

}  // namespace sparsify_conv
