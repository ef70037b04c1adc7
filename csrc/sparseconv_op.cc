// ONNX Runtime custom-op library: ai.sparsify::SparseConv, SparseConvRelu, SparseConvClip,
// SparseConvAdd and SparseConvAddRelu (since version 1), fp32 on CPU.
//
// Contract (the function bodies in sparsify/runtime/onnx_sparse.py say the same in ONNX):
// Y = Conv(X, dense(W, row_ptr, col_idx), B) with ONNX Conv attributes strides/pads/dilations/
// group, where dense[o, col_idx[k]] = W[k] for the k of row o; SparseConvRelu is Relu of that,
// SparseConvClip is Clip(that, min, max) with float attributes min / max (default -inf / +inf).
// SparseConvAdd takes a sixth input Z of Y's shape (the residual branch) and is Conv(...) + Z;
// SparseConvAddRelu is Relu(Conv(...) + Z). SparseConvPre takes inputs S and T ([Cin], sixth and
// seventh) and convolves Relu(X * S + T) (per input channel: an inference BatchNormalization and
// Relu before the conv, DenseNet's pre-activation); SparseConvPreRelu is Relu of that. Both take
// optional further inputs X_2 .. X_n after T (variadic): the conv's input is then the channel
// Concat of X, X_2, .., X_n, read piece by piece (DenseNet's concatenated features without the
// Concat node).
//
// Registration uses the plain C API (an OrtCustomOp struct) rather than the C++ wrappers: the
// V2 callbacks return OrtStatus* so every validation failure becomes an ORT error status without
// C++ exceptions crossing the library boundary, the library holds no Ort:: global state, and
// OrtCustomOp::version can be pinned to the API version of the headers we build against (29)
// so that newer runtimes accept the library. We request that API version from the runtime, which
// fails cleanly (an error status, no crash) on an older onnxruntime.
//
// Parallelism: the kernel runs on the session's intra-op thread pool through
// KernelContext_ParallelFor; it never starts threads of its own. The session config entry
// ai.sparsify.intra_op_num_threads (set by sparsify.runtime.session) tells it the pool's size.
#include <onnxruntime_c_api.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif
#include <mutex>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "sparseconv_common.h"

#if defined(_WIN32)
#define SPARSIFY_EXPORT __declspec(dllexport)
#else
#define SPARSIFY_EXPORT __attribute__((visibility("default")))
#endif

namespace {

using sparsify_conv::Geom;
using sparsify_conv::KernelFns;
using sparsify_conv::Plan;

constexpr const char* kDomain = "ai.sparsify";
// The ops of the domain, one row each: SparseConv and the fusions the exporter writes.
//  - SparseConvRelu: + Relu (ORT fuses its own Conv + Relu the same way; a separate Relu node cost
//    a sparse VGG 7-13% of its time at batch 1). SparseConvClip: + Clip with constant bounds
//    (ReLU6 in MobileNets), its min / max attributes.
//  - SparseConvAdd / SparseConvAddRelu: the residual Add (+ Relu): the sum input Z (input 5) is
//    added to each output vector while it is still in cache (ORT's own FusedConv has the same
//    optional Z input; as separate nodes the Add and Relu cost a sparse ResNet-50 about 6% of its
//    time at batch 1).
//  - SparseConvPre / SparseConvPreRelu: BatchNormalization + Relu before the conv (DenseNet):
//    the input is Relu(X * S + T) with S, T inputs 5 and 6, applied in one pass over the input
//    inside the op (as separate NCHW nodes they took 15% of a sparse DenseNet-121 at batch 1).
//    Inputs 7.. (variadic, none or more): further pieces of the input along the channel axis;
//    the op reads them where they are, so DenseNet's per-layer Concats go (they took 11% of the
//    sparse DenseNet-121 on one thread and 39% on two at batch 1: ORT's Concat slows on two).
// Any op may end in a MaxPool (attributes pool_kernel_shape, pool_strides, pool_pads; ceil_mode 0):
// the conv's output goes to scratch memory and is pooled plane by plane (the stem's pool in
// ResNets and DenseNets, which ORT ran in NCHWc behind a reorder of the stem's whole output).
struct OpVariant {
  const char* name;
  size_t inputs;  // fixed inputs; the pre ops have one more, variadic (the input's further pieces)
  bool clamp;  // every output clamped to [lo, hi] (Relu: [0, inf))
  bool clip;   // lo, hi from the min / max attributes
  bool sum;
  bool pre;
};
constexpr OpVariant kVariants[] = {
    {"SparseConv", 5, false, false, false, false},     {"SparseConvRelu", 5, true, false, false, false},
    {"SparseConvClip", 5, true, true, false, false},   {"SparseConvAdd", 6, false, false, true, false},
    {"SparseConvAddRelu", 6, true, false, true, false}, {"SparseConvPre", 7, false, false, false, true},
    {"SparseConvPreRelu", 7, true, false, false, true},
};
constexpr size_t kNumVariants = sizeof(kVariants) / sizeof(kVariants[0]);
// Session config entry that tells the kernel the session's intra-op thread count (the C API
// gives a kernel no other way to know it); sparsify.runtime.session sets it. With one thread the
// kernel runs whole images in one pass instead of splitting them into tasks for other threads.
constexpr const char* kThreadsKey = "ai.sparsify.intra_op_num_threads";

// Set by RegisterCustomOps; every registration stores the same pointers (unless the
// SPARSIFY_KERNEL_ISA test knob changed in between).
const OrtApi* g_api = nullptr;
std::atomic<const KernelFns*> g_narrow{nullptr};  // for output rows of <= 8 floats
std::atomic<const KernelFns*> g_wide{nullptr};    // for wider rows
std::atomic<bool> g_split_wide{false};            // see splits_wide_vectors

#define SPARSIFY_TRY(expr)          \
  do {                              \
    OrtStatus* _st = (expr);        \
    if (_st != nullptr) return _st; \
  } while (0)

// Picks the kernels for this CPU. SPARSIFY_KERNEL_ISA=baseline|avx2 caps the choice (tests use
// it to exercise every path on one machine); it never enables an ISA the CPU lacks.
void select_kernels(const KernelFns** narrow, const KernelFns** wide) {
  *narrow = *wide = sparsify_conv::base_kernels();
#if defined(__x86_64__) || defined(_M_X64)
  const char* cap = std::getenv("SPARSIFY_KERNEL_ISA");
  const std::string limit = cap != nullptr ? cap : "";
  if (limit == "baseline") return;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    *narrow = *wide = sparsify_conv::avx2_kernels();
  else
    return;
  if (limit == "avx2") return;
  if (!__builtin_cpu_supports("avx512f")) return;
  *wide = sparsify_conv::avx512_kernels();
  if (__builtin_cpu_supports("avx512vl")) *narrow = sparsify_conv::avx512y_kernels();
#endif
}

// Whether this CPU executes a 16-float FMA as two 8-float halves (AMD Zen 4, family 0x19): there
// the narrow unit's 8-float vectors run as many lanes per cycle as the wide unit's, so a 1x1 conv's
// small plane loses fewer lanes on them (narrow_plane in Compute). Intel's AVX-512 cores run 16
// floats per FMA: the same 1x1 convs on 7x7 planes took 0.65-0.72 ms on 8-float vectors against
// 0.50-0.56 ms on 16-float ones (512->2048, density 0.1, Xeon). SPARSIFY_KERNEL_SPLIT_WIDE=0|1
// overrides the detection (tests run both choices on one machine).
bool splits_wide_vectors() {
  const char* knob = std::getenv("SPARSIFY_KERNEL_SPLIT_WIDE");
  if (knob != nullptr && (knob[0] == '0' || knob[0] == '1') && knob[1] == '\0') return knob[0] == '1';
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(0, &a, &b, &c, &d) == 0) return false;
  const bool amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "AuthenticAMD"
  if (!amd || __get_cpuid(1, &a, &b, &c, &d) == 0) return false;
  unsigned family = (a >> 8) & 0xfu;
  if (family == 0xfu) family += (a >> 20) & 0xffu;
  return family == 0x19u;
#else
  return false;
#endif
}

OrtStatus* invalid(const std::string& msg) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, ("SparseConv: " + msg).c_str());
}

std::string str(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

// ---------------------------------------------------------------------------------------------
// Kernel state: the node's attributes, read and checked once at session creation.

// Connections regrouped by input channel for the kSmall3 CSC path (CscBlock): nb blocks of
// output channels of about equal cost; a block's entries fill the same index range as its rows'
// entries in CSR order, sorted by input channel.
struct CscLayout {
  int64_t cin = 0, cin_per_group = 0, nb = 0;
  std::vector<int64_t> bounds, chan, start, out;
  std::vector<int64_t> col0;  // per block: its first column in chan, its first start in start
  std::vector<float> w9;
  sparsify_conv::CscBlock block(int64_t b) const {
    const int64_t c0 = col0[size_t(b)], ncols = col0[size_t(b) + 1] - c0;
    return {bounds[size_t(b)], bounds[size_t(b) + 1], ncols, chan.data() + c0,
            start.data() + c0 + b, out.data(), w9.data()};
  }
};

struct Kernel {
  std::vector<int64_t> strides{1, 1}, pads{0, 0, 0, 0}, dilations{1, 1};
  int64_t group = 1;
  OrtMemoryInfo* cpu = nullptr;
  // row_ptr / col_idx data when they are constant initializers (known at session creation):
  // their check then runs on the first call only; validated_cpg records the input channels per
  // group it passed for (-1: not yet). Other index inputs are checked on every call.
  const void* const_row_ptr = nullptr;
  const void* const_col_idx = nullptr;
  const void* const_w = nullptr;
  // The session's intra-op thread count when its options say it (kThreadsKey; 0: unknown).
  int64_t threads = 0;
  // SparseConvRelu / SparseConvClip / SparseConvAddRelu: every output clamped to [lo, hi].
  bool clamp = false;
  // SparseConvAdd / SparseConvAddRelu: input 5 (Z) is added before the clamp.
  bool sum = false;
  // SparseConvPre / SparseConvPreRelu: the input is Relu(X * S + T) with S, T inputs 5 and 6,
  // X the channel concatenation of input 0 and inputs 7.. (if any).
  bool pre = false;
  float lo = 0.0f, hi = std::numeric_limits<float>::infinity();
  // A MaxPool after the conv (its pool_* attributes; empty pool_kernel: none): the op's output is
  // the pooled conv output (ONNX MaxPool with ceil_mode 0, dilations 1).
  std::vector<int64_t> pool_kernel, pool_strides{1, 1}, pool_pads{0, 0, 0, 0};
  mutable std::atomic<int64_t> validated_cpg{-1};
  // The by-input-channel copy of constant weights (kSmall3 planes of whole vectors), built on
  // the first call that needs it.
  mutable std::mutex csc_mu;
  mutable std::vector<std::shared_ptr<const struct CscLayout>> csc;  // one per block count
  // The shared-fan-in runs (same_fan_in) of constant indices, built on the first call.
  mutable std::shared_ptr<const std::vector<int32_t>> same;
  // Constant weights with the shared-fan-in blocks' rows interleaved (PwArgs::wi), built on the
  // first 1x1 call whose plane leaves a tail for pw_block_tail.
  mutable std::shared_ptr<const std::vector<float>> wi;
  // The 1x1 conv over the K*K shifted copies of the input that small output planes with
  // shared-fan-in blocks run instead (see Im2colLayout), built on the first such call.
  mutable std::shared_ptr<const struct Im2colLayout> im2col;
  // Constant connections with the output channels that read the same input channels made
  // neighbours (see RegroupLayout), built on the first kDirect call with a block unit.
  mutable std::shared_ptr<const struct RegroupLayout> regroup;
  ~Kernel() {
    if (cpu != nullptr) g_api->ReleaseMemoryInfo(cpu);
  }
};

// Reads an int64 list attribute; an absent attribute keeps the ONNX Conv default in *out.
OrtStatus* read_ints(const OrtKernelInfo* info, const char* name, size_t expect, int64_t min_value,
                     std::vector<int64_t>* out) {
  size_t n = 0;
  OrtStatus* st = g_api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &n);
  if (st != nullptr) {
    g_api->ReleaseStatus(st);
    return nullptr;
  }
  std::vector<int64_t> v(n);
  if (n > 0) SPARSIFY_TRY(g_api->KernelInfoGetAttributeArray_int64(info, name, v.data(), &n));
  if (n != expect)
    return invalid(std::string("attribute ") + name + " must have " + std::to_string(expect) +
                   " values for a 2-D convolution, got " + str(v));
  for (int64_t x : v)
    if (x < min_value)
      return invalid(std::string("attribute ") + name + "=" + str(v) + " has a value below " +
                     std::to_string(min_value));
  *out = v;
  return nullptr;
}

// An op registered with ORT: the C API's description plus its row of kVariants (ORT hands the
// OrtCustomOp pointer back to every callback).
struct SparseOp {
  OrtCustomOp op;
  const OpVariant* variant;
};
static_assert(offsetof(SparseOp, op) == 0, "ORT's OrtCustomOp pointer must be the SparseOp's address");
const OpVariant& variant_of(const OrtCustomOp* op) { return *reinterpret_cast<const SparseOp*>(op)->variant; }

// A float attribute, or `fallback` when the node does not have it.
float read_float(const OrtKernelInfo* info, const char* name, float fallback) {
  float v = fallback;
  OrtStatus* st = g_api->KernelInfoGetAttribute_float(info, name, &v);
  if (st != nullptr) {
    g_api->ReleaseStatus(st);
    return fallback;
  }
  return v;
}

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info,
                                      void** kernel) {
  *kernel = nullptr;
  Kernel* k = new (std::nothrow) Kernel();
  if (k == nullptr) return g_api->CreateStatus(ORT_FAIL, "SparseConv: out of memory");
  const OpVariant& v = variant_of(op);
  k->clamp = v.clamp;
  k->sum = v.sum;
  k->pre = v.pre;
  if (v.clip) {
    k->lo = read_float(info, "min", -std::numeric_limits<float>::infinity());
    k->hi = read_float(info, "max", std::numeric_limits<float>::infinity());
    if (!(k->lo <= k->hi)) {
      delete k;
      return invalid("SparseConvClip needs min <= max, got min=" + std::to_string(k->lo) +
                     " max=" + std::to_string(k->hi) + "; fix the node's min / max attributes or "
                     "re-export the model");
    }
  }
  OrtStatus* st = read_ints(info, "strides", 2, 1, &k->strides);
  if (st == nullptr) st = read_ints(info, "pads", 4, 0, &k->pads);
  if (st == nullptr) st = read_ints(info, "dilations", 2, 1, &k->dilations);
  if (st == nullptr) {
    int64_t g = 1;
    OrtStatus* gs = g_api->KernelInfoGetAttribute_int64(info, "group", &g);
    if (gs != nullptr) {
      g_api->ReleaseStatus(gs);
      g = 1;
    }
    if (g < 1) st = invalid("attribute group=" + std::to_string(g) + " must be >= 1");
    k->group = g;
  }
  if (st == nullptr) st = read_ints(info, "pool_kernel_shape", 2, 1, &k->pool_kernel);
  if (st == nullptr && !k->pool_kernel.empty()) {
    st = read_ints(info, "pool_strides", 2, 1, &k->pool_strides);
    if (st == nullptr) st = read_ints(info, "pool_pads", 4, 0, &k->pool_pads);
    for (int i = 0; st == nullptr && i < 4; ++i)
      if (k->pool_pads[size_t(i)] >= k->pool_kernel[size_t(i % 2)])
        st = invalid("attribute pool_pads=" + str(k->pool_pads) + " must be smaller than pool_kernel_shape=" +
                     str(k->pool_kernel) + " (a window of padding only); re-export the model");
  }
  if (st == nullptr) st = g_api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &k->cpu);
  if (st == nullptr) {
    const void** slots[3] = {&k->const_w, &k->const_row_ptr, &k->const_col_idx};
    for (size_t i = 0; i < 3; ++i) {
      int is_const = 0;
      const OrtValue* v = nullptr;
      OrtStatus* cs = g_api->KernelInfoGetConstantInput_tensor(info, 1 + i, &is_const, &v);
      const void* data = nullptr;
      if (cs == nullptr && is_const && v != nullptr) cs = g_api->GetTensorData(v, &data);
      if (cs != nullptr) {
        g_api->ReleaseStatus(cs);
        data = nullptr;
      }
      *slots[i] = is_const ? data : nullptr;
    }
  }
  if (st == nullptr) {
    OrtKeyValuePairs* cfg = nullptr;
    OrtStatus* cs = g_api->KernelInfo_GetConfigEntries(info, &cfg);
    if (cs != nullptr) {
      g_api->ReleaseStatus(cs);
    } else if (cfg != nullptr) {
      const char* v = g_api->GetKeyValue(cfg, kThreadsKey);
      if (v != nullptr) {
        char* end = nullptr;
        const long long t = std::strtoll(v, &end, 10);
        if (end != v && *end == '\0' && t >= 1) k->threads = t;
      }
      g_api->ReleaseKeyValuePairs(cfg);
    }
  }
  if (st != nullptr) {
    delete k;
    return st;
  }
  *kernel = k;
  return nullptr;
}

void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }

// ---------------------------------------------------------------------------------------------
// Compute.

struct TensorView {
  const OrtValue* value = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
};

OrtStatus* view(const OrtValue* v, TensorView* out) {
  out->value = v;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  SPARSIFY_TRY(g_api->GetTensorTypeAndShape(v, &info));
  size_t rank = 0;
  OrtStatus* st = g_api->GetTensorElementType(info, &out->type);
  if (st == nullptr) st = g_api->GetDimensionsCount(info, &rank);
  if (st == nullptr) {
    out->dims.resize(rank);
    if (rank > 0) st = g_api->GetDimensions(info, out->dims.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

// Scratch memory from the session's CPU allocator (an arena: no page faults per call).
struct Scratch {
  OrtAllocator* alloc = nullptr;
  void* ptr = nullptr;
  ~Scratch() {
    if (ptr != nullptr) alloc->Free(alloc, ptr);
    if (alloc != nullptr) g_api->ReleaseAllocator(alloc);
  }
};

// Floats of output per call of the fused activation when channels lie back to back.
constexpr int64_t kClampRun = 2048;
// Smallest work item, in multiply-adds.
constexpr int64_t kMinTaskWork = 1 << 16;
// Bytes of padded input (all input channels) that one strip of output rows may use.
constexpr int64_t kStripBytes = 256 * 1024;
// Inputs of at least this many bytes are prefetched a strip ahead (smaller ones stay in cache
// between layers; prefetching them cost 1-2% at batch 1, and gained 7-13% at batch 8 on 56x56).
constexpr int64_t kPrefetchBytes = 4 << 20;
// Outputs of at least this many bytes are written with non-temporal stores where the path can.
constexpr int64_t kStreamBytes = 16 << 20;
// Bytes of a 1x1 conv's input tile (all input channels of a group).
constexpr int64_t kPwTileBytes = 256 * 1024;
// A 1x1 conv's input rows are copied to aligned rows when each task reads each of them at least
// this many times (misaligned_rows).
constexpr int64_t kAlignMinReads = 16;
// Densities up to which the narrow unit's 1x1 convs on small planes (7x7) copy their rows to
// aligned rows (misaligned_rows): 1 thread, one fan-in per output channel, 2048->512, 512->2048,
// 160->960 on 7x7 and the strided 1024->2048 to 7x7 at density 0.1: 1.00-1.11x at batch 1,
// 1.14-1.23x at batch 8; at 0.25: 0.93-1.12x; at 0.5: 0.79-1.17x (larger rows crowd L2).
constexpr double kNarrowAlignMaxDensity = 0.15;
// 1x1 convs on planes of at most this many pixels that leave up to half a vector over run on
// the narrow unit's vectors.
constexpr int64_t kPwNarrowPixels = 128;

struct Job {
  const Geom* g;
  const Plan* p;
  const KernelFns* f;
  const float* X;
  float* xp;
  float* Y;
  const float* W;
  const int64_t* row_ptr;
  const int64_t* col_idx;
  const float* B;
  int64_t per;  // planes per pad task
  int64_t nob;  // output-channel blocks per image
  const int64_t* bounds;  // nob + 1 block boundaries over output channels (about equal nnz)
  // Buffers that tasks claim for their padded input (nullptr when the tasks share one padded
  // copy): nslots buffers of slot floats, `busy` says which are in use.
  std::atomic<bool>* busy;
  int64_t nslots, slot;
  int64_t ns, rows;  // strip tasks: strips per image, output rows per strip (0: no strips)
  const struct CscLayout* csc;  // kSmall3 by input channel: nob blocks
  const Kernel* k;               // clamp / lo / hi: tasks finish what they wrote
  const float* Z;                // the sum input (Y's shape) or nullptr
  sparsify_conv::Epilogue e;
  const int32_t* same = nullptr;  // shared-fan-in runs (same_fan_in), nullptr: none
  // perm[o]: the node's output channel that row o of row_ptr / col_idx / W computes (a
  // RegroupLayout); nullptr: row o is channel o.
  const int64_t* perm = nullptr;
};

// The node's output channel that row o of a Job's connections computes.
inline int64_t channel(const Job& j, int64_t o) { return j.perm != nullptr ? j.perm[o] : o; }

// The epilogue (sum input, activation) over n floats of Y from y on: Z holds the same offsets.
inline void finish(const Job& j, float* y, int64_t n) {
  j.f->epilogue(y, j.Z != nullptr ? j.Z + (y - j.Y) : nullptr, n, j.e);
}

// Tasks pad into the lowest free buffer rather than one of their own, so the few buffers in use
// (one per running thread) stay in cache across tasks.
int64_t claim_slot(std::atomic<bool>* busy, int64_t nslots) {
  for (;;)
    for (int64_t s = 0; s < nslots; ++s) {
      bool expected = false;
      if (!busy[s].load(std::memory_order_relaxed) &&
          busy[s].compare_exchange_strong(expected, true, std::memory_order_acquire))
        return s;
    }
}

int64_t claim_buffer(const Job& j) { return claim_slot(j.busy, j.nslots); }

void pad_task(void* ud, size_t i) {
  const Job& j = *static_cast<const Job*>(ud);
  const int64_t total = j.g->N * j.g->Cin, hw = j.g->H * j.g->W;
  const int64_t end = (int64_t(i) + 1) * j.per < total ? (int64_t(i) + 1) * j.per : total;
  for (int64_t idx = int64_t(i) * j.per; idx < end; ++idx)
    j.f->pad_channel(*j.g, *j.p, j.X + idx * hw, j.xp + idx * j.p->plane);
}

// Output channels [o_begin, o_end) of one image (or one strip of rows of it, described by g and
// p); output channel o's plane starts at y_n + o * ystride.
// Input rows a strip task fetches into L2 while it computes (the next strip's): `chans` runs of
// `floats` floats, `stride` floats apart.
struct Prefetch {
  const float* base = nullptr;
  int64_t chans = 0, floats = 0, stride = 0;
};

void conv_channels(const Job& j, const Geom& g, const Plan& p, int64_t o_begin, int64_t o_end,
                   const float* x_n, const float* xp_n, float* y_n, int64_t ystride, const Prefetch& pf = {}) {
  const int64_t kk = g.kH * g.kW;
  // The flat and direct paths walk one row block at a time over all output channels of the block
  // (the block's input rows stay in cache while every output channel reads them: walking whole
  // planes streamed every connection's padded plane from L3 on 56x56 inputs); others whole planes.
  const int64_t strip = (p.kind == sparsify_conv::kFlat3 || p.kind == sparsify_conv::kDirect) ? p.strip : g.Ho;
  // The fused activation runs on output still in L1: each channel's rows just computed, or, when
  // whole planes lie back to back, runs of channels of about kClampRun floats (one call per
  // 2x2 plane cost vgg16n 7% at batch 16).
  const int64_t plane = g.Ho * g.Wo;
  const bool runs = strip == g.Ho && ystride == plane && j.perm == nullptr;
  int64_t run0 = o_begin;
  for (int64_t r0 = 0; r0 < g.Ho; r0 += strip) {
    const int64_t r1 = r0 + strip < g.Ho ? r0 + strip : g.Ho;
    for (int64_t o = o_begin, oe; o < o_end; o = oe) {
      const int64_t start = j.row_ptr[o], cnt = j.row_ptr[o + 1] - start;
      const int64_t cin_base = (o / g.cout_per_group) * g.cin_per_group;
      // Runs of kFanInBlock channels with one fan-in go together where the path has a block unit.
      bool block = false;
      if (j.same != nullptr && j.same[o] >= sparsify_conv::kFanInBlock && o + sparsify_conv::kFanInBlock <= o_end) {
        float* ys[sparsify_conv::kFanInBlock];
        const float* ws[sparsify_conv::kFanInBlock];
        float bias[sparsify_conv::kFanInBlock];
        for (int b = 0; b < sparsify_conv::kFanInBlock; ++b) {
          ys[b] = y_n + channel(j, o + b) * ystride;
          ws[b] = j.W + j.row_ptr[o + b] * kk;
          bias[b] = j.B != nullptr ? j.B[channel(j, o + b)] : 0.0f;
        }
        block = j.f->compute_block(g, p, xp_n, ys, ws, j.col_idx + start, cnt, bias, cin_base, r0, r1);
      }
      oe = o + (block ? sparsify_conv::kFanInBlock : 1);
      if (pf.base != nullptr && r0 == 0) {
        // A share of the next strip's input rows per output channel, spread over the first row block.
        const int64_t c0 = (o - o_begin) * pf.chans / (o_end - o_begin);
        const int64_t c1 = (oe - o_begin) * pf.chans / (o_end - o_begin);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t q = 0; q < pf.floats; q += 16) __builtin_prefetch(pf.base + c * pf.stride + q, 0, 2);
      }
      if (!block)
        j.f->compute_channel(g, p, x_n, xp_n, y_n + channel(j, o) * ystride, j.W + start * kk, j.col_idx + start,
                             cnt, j.B != nullptr ? j.B[channel(j, o)] : 0.0f, cin_base, r0, r1);
      if (!j.e.clamp && j.Z == nullptr) continue;
      if (!runs) {
        for (int64_t q = o; q < oe; ++q) finish(j, y_n + channel(j, q) * ystride + r0 * g.Wo, (r1 - r0) * g.Wo);
      } else if ((oe - run0) * plane >= kClampRun || oe == o_end) {
        finish(j, y_n + run0 * plane, (oe - run0) * plane);
        run0 = oe;
      }
    }
  }
}

void conv_task(void* ud, size_t i) {
  const Job& j = *static_cast<const Job*>(ud);
  const Geom& g = *j.g;
  const int64_t n = int64_t(i) / j.nob, b = int64_t(i) % j.nob;
  const float* x_n = j.X + n * g.Cin * g.H * g.W;
  float* xp_n = j.xp != nullptr ? j.xp + n * g.Cin * j.p->plane : nullptr;
  // One task per image (nob == 1): it pads its image just before use into a free buffer that is
  // likely still in this core's cache (no separate pass over all N images' copies).
  const int64_t slot = j.busy != nullptr ? claim_buffer(j) : -1;
  if (slot >= 0) {
    xp_n = j.xp + slot * j.slot;
    for (int64_t c = 0; c < g.Cin; ++c)
      j.f->pad_channel(g, *j.p, x_n + c * g.H * g.W, xp_n + c * j.p->plane);
  }
  conv_channels(j, g, *j.p, j.bounds[b], j.bounds[b + 1], x_n, xp_n,
                j.Y + n * g.Cout * g.Ho * g.Wo, g.Ho * g.Wo);
  if (slot >= 0) j.busy[slot].store(false, std::memory_order_release);
}

// Output rows [r0, r1) of a convolution are a convolution of their own: over input rows
// [*row_lo, ...) with the top / bottom padding that falls inside the strip.
Geom strip_geom(const Geom& g, int64_t r0, int64_t r1, int64_t* row_lo) {
  Geom s = g;
  const int64_t lo = r0 * g.sH - g.pt, hi = (r1 - 1) * g.sH - g.pt + (g.kH - 1) * g.dH + 1;
  int64_t lo_c = lo < 0 ? 0 : lo > g.H ? g.H : lo;
  int64_t hi_c = hi > g.H ? g.H : hi;
  if (hi_c < lo_c) hi_c = lo_c;
  s.pt = lo_c - lo;
  s.pb = hi - hi_c;
  s.H = hi_c - lo_c;
  s.Ho = r1 - r0;
  *row_lo = lo_c;
  return s;
}

// Sets max_plane to the largest padded plane of ns strips of `rows` output rows (edge strips pad
// differently); false when a strip's plan reads X directly (no strips then).
bool strip_planes(const Geom& g, const KernelFns* fns, int64_t ns, int64_t rows, int64_t* max_plane) {
  for (int64_t s = 0; s < ns; ++s) {
    int64_t lo = 0;
    const int64_t r1 = (s + 1) * rows < g.Ho ? (s + 1) * rows : g.Ho;
    Plan ps;
    fns->make_plan(strip_geom(g, s * rows, r1, &lo), &ps);
    if (ps.reads_x) return false;
    if (ps.plane > *max_plane) *max_plane = ps.plane;
  }
  return true;
}

// Strips of output rows for few images on T threads: among up to max_ns strips, the count whose
// slowest thread computes the fewest rows, counting the rows a strip's plan wastes to its row
// block (5-row strips of a 28x28 plane ran in 8-row blocks: 1.7x the work of the whole plane)
// plus a little per strip for its halo rows and setup. Returns the count (0: no strips) and sets
// the rows per strip and the largest padded plane of a strip's plan.
int64_t pick_strips(const Geom& g, const KernelFns* fns, int64_t T, int64_t max_ns, int64_t* rows,
                    int64_t* max_plane) {
  int64_t best = 0;
  double best_cost = 0.0;
  for (int64_t n = 2; n <= max_ns && n <= g.Ho; ++n) {
    const int64_t r = (g.Ho + n - 1) / n, ns = (g.Ho + r - 1) / r;
    if (ns != n) continue;  // the same strips as a smaller count
    int64_t lo = 0;
    Plan ps;
    fns->make_plan(strip_geom(g, 0, r, &lo), &ps);
    if (ps.reads_x) return 0;
    const int64_t blk = ps.kind == sparsify_conv::kFlat3   ? int64_t(ps.R) * ps.P
                        : ps.kind == sparsify_conv::kDirect ? int64_t(ps.R)
                                                            : 1;
    const double per_strip = double((r + blk - 1) / blk * blk) + 0.25 * double(g.kH);
    const double cost = double((ns + T - 1) / T) * per_strip;
    if (best == 0 || cost < best_cost) {
      best = ns;
      best_cost = cost;
      *rows = r;
    }
  }
  if (best == 0) return 0;
  return strip_planes(g, fns, best, *rows, max_plane) ? best : 0;
}

// Rows per strip (a multiple of the plan's row block) whose padded input rows of all input
// channels fit in kStripBytes, or Ho when the whole plane does.
int64_t cache_strip_rows(const Geom& g, const KernelFns* fns, const Plan& p) {
  const int64_t blk = p.kind == sparsify_conv::kFlat3 ? int64_t(p.R) * p.P : p.kind == sparsify_conv::kDirect ? p.R : 1;
  int64_t best = blk;
  for (int64_t r = blk; r < g.Ho; r += blk) {
    int64_t lo = 0;
    Plan ps;
    fns->make_plan(strip_geom(g, 0, r, &lo), &ps);
    if (g.Cin * ps.plane * int64_t(sizeof(float)) > kStripBytes) break;
    best = r;
  }
  return best < g.Ho ? best : g.Ho;
}

// Few images (batch 1): tasks are strips of output rows over all output channels, each an
// independent convolution that pads only its own input rows into a buffer of its own. (Blocks of
// output channels over one shared padded copy made every core read rows the other had just
// written: on the 2-core machine a 2-thread layer ran slower than a 1-thread one.)
void strip_task(void* ud, size_t i) {
  const Job& j = *static_cast<const Job*>(ud);
  const Geom& g = *j.g;
  const int64_t n = int64_t(i) / j.ns, r0 = (int64_t(i) % j.ns) * j.rows;
  const int64_t r1 = r0 + j.rows < g.Ho ? r0 + j.rows : g.Ho;
  int64_t lo = 0;
  const Geom gs = strip_geom(g, r0, r1, &lo);
  Plan ps;
  j.f->make_plan(gs, &ps);
  const int64_t slot = claim_buffer(j);
  float* xp = j.xp + slot * j.slot;
  const float* x_n = j.X + n * g.Cin * g.H * g.W + lo * g.W;
  for (int64_t c = 0; c < g.Cin; ++c) j.f->pad_channel(gs, ps, x_n + c * g.H * g.W, xp + c * ps.plane);
  // The next strip of this image (or the first of the next one) pads from rows that are likely
  // in memory, not cache, at batch 8 on 56x56 planes: fetch them into L2 now.
  Prefetch pf;
  const int64_t next = int64_t(i) + 1;
  if (next < g.N * j.ns && g.N * g.Cin * g.H * g.W * int64_t(sizeof(float)) >= kPrefetchBytes) {
    const int64_t nn = next / j.ns, nr0 = (next % j.ns) * j.rows;
    const int64_t nr1 = nr0 + j.rows < g.Ho ? nr0 + j.rows : g.Ho;
    int64_t nlo = 0;
    const Geom ng = strip_geom(g, nr0, nr1, &nlo);
    pf = {j.X + nn * g.Cin * g.H * g.W + nlo * g.W, g.Cin, ng.H * g.W, g.H * g.W};
  }
  conv_channels(j, gs, ps, 0, g.Cout, x_n, xp, j.Y + n * g.Cout * g.Ho * g.Wo + r0 * g.Wo,
                g.Ho * g.Wo, pf);
  j.busy[slot].store(false, std::memory_order_release);
}

// nob + 1 boundaries of blocks of output channels of about equal cost (live connections plus
// one per channel).
std::vector<int64_t> block_bounds(const int64_t* row_ptr, int64_t cout, int64_t nob) {
  std::vector<int64_t> bounds(size_t(nob + 1), cout);
  bounds[0] = 0;
  const int64_t total = row_ptr[cout] + cout;
  int64_t b = 1;
  for (int64_t o = 0; o < cout && b < nob; ++o) {
    // Channel o ends block b once the cumulative cost reaches b / nob of the total.
    if ((row_ptr[o + 1] + o + 1) * nob >= b * total) bounds[size_t(b++)] = o + 1;
  }
  return bounds;
}

// Regroups a 3x3 layer's connections by input channel within nb blocks of output channels.
std::shared_ptr<CscLayout> build_csc(const Geom& g, const float* W, const int64_t* row_ptr,
                                     const int64_t* col_idx, int64_t nb) {
  auto L = std::make_shared<CscLayout>();
  L->cin = g.Cin;
  L->cin_per_group = g.cin_per_group;
  L->nb = nb;
  L->bounds = block_bounds(row_ptr, g.Cout, nb);
  const int64_t nnz = row_ptr[g.Cout];
  L->out.resize(size_t(nnz));
  L->w9.resize(size_t(nnz) * 9);
  L->col0.push_back(0);
  std::vector<int64_t> count(size_t(g.Cin) + 1);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t ob = L->bounds[size_t(b)], oe = L->bounds[size_t(b) + 1];
    std::fill(count.begin(), count.end(), 0);
    for (int64_t o = ob; o < oe; ++o) {
      const int64_t base = (o / g.cout_per_group) * g.cin_per_group;
      for (int64_t q = row_ptr[o]; q < row_ptr[o + 1]; ++q) ++count[size_t(base + col_idx[q]) + 1];
    }
    // Columns: the input channels this block reads; entries sorted by column from row_ptr[ob].
    std::vector<int64_t> pos(size_t(g.Cin));
    int64_t at = row_ptr[ob];
    for (int64_t i = 0; i < g.Cin; ++i) {
      pos[size_t(i)] = at;
      if (count[size_t(i) + 1] == 0) continue;
      L->chan.push_back(i);
      L->start.push_back(at);
      at += count[size_t(i) + 1];
    }
    L->start.push_back(at);
    L->col0.push_back(int64_t(L->chan.size()));
    for (int64_t o = ob; o < oe; ++o) {
      const int64_t base = (o / g.cout_per_group) * g.cin_per_group;
      for (int64_t q = row_ptr[o]; q < row_ptr[o + 1]; ++q) {
        const int64_t e = pos[size_t(base + col_idx[q])]++;
        L->out[size_t(e)] = o;
        std::memcpy(&L->w9[size_t(e) * 9], W + q * 9, 9 * sizeof(float));
      }
    }
  }
  return L;
}

void csc_task(void* ud, size_t i) {
  const Job& j = *static_cast<const Job*>(ud);
  const Geom& g = *j.g;
  const int64_t n = int64_t(i) / j.nob, b = int64_t(i) % j.nob, hw = g.H * g.W;
  const sparsify_conv::CscBlock blk = j.csc->block(b);
  float* y_n = j.Y + n * g.Cout * hw;
  j.f->csc_block(g, *j.p, j.X + n * g.Cin * hw, y_n, j.B, blk);
  if (j.e.clamp || j.Z != nullptr) finish(j, y_n + blk.o_begin * hw, (blk.o_end - blk.o_begin) * hw);
}

// same[o] (PwArgs, Job): how many output channels from o on (o included, at most kFanInBlock, all
// in o's group) list exactly o's input channels. Empty when no kFanInBlock of them do (no block).
std::vector<int32_t> same_fan_in(const Geom& g, const int64_t* row_ptr, const int64_t* col_idx) {
  std::vector<int32_t> same(size_t(g.Cout), 1);
  bool any = false;
  for (int64_t o = g.Cout - 2; o >= 0; --o) {
    const int64_t s = row_ptr[o], n = row_ptr[o + 1] - s;
    if (n > 0 && (o + 1) % g.cout_per_group != 0 && row_ptr[o + 2] - row_ptr[o + 1] == n &&
        std::equal(col_idx + s, col_idx + s + n, col_idx + s + n)) {
      same[size_t(o)] = std::min<int32_t>(sparsify_conv::kFanInBlock, same[size_t(o) + 1] + 1);
      any = any || same[size_t(o)] == sparsify_conv::kFanInBlock;
    }
  }
  if (!any) same.clear();
  return same;
}

// same_fan_in of this call's indices: built once for constant index initializers (kept in k),
// else on every call (one pass over col_idx).
std::shared_ptr<const std::vector<int32_t>> shared_runs(const Kernel& k, const Geom& g, const int64_t* row_ptr,
                                                        const int64_t* col_idx) {
  std::shared_ptr<const std::vector<int32_t>> same;
  const bool constant = row_ptr == k.const_row_ptr && col_idx == k.const_col_idx;
  if (constant) {
    std::lock_guard<std::mutex> lock(k.csc_mu);
    same = k.same;
  }
  if (!same) {
    same = std::make_shared<const std::vector<int32_t>>(same_fan_in(g, row_ptr, col_idx));
    if (constant) {
      std::lock_guard<std::mutex> lock(k.csc_mu);
      k.same = same;
    }
  }
  return same;
}

// The steps of the kernels' walk over output channels from 0, in order: f(o, true) where channels
// o .. o + kFanInBlock - 1 run as one shared-fan-in block (same[o] >= kFanInBlock), f(o, false)
// for a channel run alone. interleave_blocks, channels_in_blocks and snap_to_blocks all follow it.
template <class F>
void walk_fan_in_blocks(const int32_t* same, int64_t cout, F&& f) {
  constexpr int64_t B = sparsify_conv::kFanInBlock;
  for (int64_t o = 0; o < cout;) {
    const bool block = same[o] >= B;
    f(o, block);
    o += block ? B : 1;
  }
}

// W with the rows of every shared-fan-in block interleaved: entry k of channel o + r at
// row_ptr[o] + kFanInBlock * k + r (PwArgs::wi). Blocks start where the kernels' walk from channel
// 0 puts them (snap_to_blocks keeps task ranges on those starts).
std::vector<float> interleave_blocks(const Geom& g, const float* W, const int64_t* row_ptr, const int32_t* same) {
  constexpr int64_t B = sparsify_conv::kFanInBlock;
  std::vector<float> wi(W, W + row_ptr[g.Cout]);
  walk_fan_in_blocks(same, g.Cout, [&](int64_t o, bool block) {
    if (!block) return;
    const int64_t s = row_ptr[o], cnt = row_ptr[o + 1] - s;
    for (int64_t r = 0; r < B; ++r)
      for (int64_t q = 0; q < cnt; ++q) wi[size_t(s + B * q + r)] = W[s + r * cnt + q];
  });
  return wi;
}

// interleave_blocks of constant weights and indices, built once and kept in k; nullptr for
// weights that may change between calls (the copy would cost a pass over them per call).
const float* interleaved_weights(const Kernel& k, const Geom& g, const float* W, const int64_t* row_ptr,
                                 const int64_t* col_idx, const int32_t* same) {
  if (W != k.const_w || row_ptr != k.const_row_ptr || col_idx != k.const_col_idx) return nullptr;
  std::lock_guard<std::mutex> lock(k.csc_mu);
  if (!k.wi) k.wi = std::make_shared<const std::vector<float>>(interleave_blocks(g, W, row_ptr, same));
  return k.wi->data();
}

// Output channels whose connections list the same input channels, made neighbours so that the
// kDirect block unit runs them kFanInBlock at a time: a stem of 64 channels that each read one of
// three input channels has no such run in the node's order, yet every channel shares its fan-in
// with about 20 others (7x7/s2 3->64 on 224x224 at one connection per channel: 1.8 -> 1.2 ms).
// perm[q]: the node's channel that row q computes; row_ptr / col_idx / W: the connections in
// that order; same: their same_fan_in. perm empty: regrouping adds no block.
struct RegroupLayout {
  std::vector<int64_t> perm, row_ptr, col_idx;
  std::vector<float> W;
  std::vector<int32_t> same;
};

// Channels in kFanInBlock runs as the kernels walk them (same_fan_in; empty: none).
int64_t channels_in_blocks(const std::vector<int32_t>& same) {
  int64_t covered = 0;
  walk_fan_in_blocks(same.data(), int64_t(same.size()),
                     [&](int64_t, bool block) { covered += block ? sparsify_conv::kFanInBlock : 0; });
  return covered;
}

// The RegroupLayout of constant connections, built once and kept in k; nullptr for connections
// that may change between calls.
std::shared_ptr<const RegroupLayout> regroup_layout(const Kernel& k, const Geom& g, const float* W,
                                                    const int64_t* row_ptr, const int64_t* col_idx,
                                                    const std::vector<int32_t>& same) {
  if (W != k.const_w || row_ptr != k.const_row_ptr || col_idx != k.const_col_idx) return nullptr;
  {
    std::lock_guard<std::mutex> lock(k.csc_mu);
    if (k.regroup) return k.regroup;
  }
  auto L = std::make_shared<RegroupLayout>();
  const int64_t cout = g.Cout, kk = g.kH * g.kW, cpg = g.cout_per_group > 0 ? g.cout_per_group : cout;
  std::vector<int64_t> order(static_cast<size_t>(cout));
  for (int64_t o = 0; o < cout; ++o) order[size_t(o)] = o;
  // By group (rows stay in their group's range), then by the list of input channels.
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    if (a / cpg != b / cpg) return a / cpg < b / cpg;
    return std::lexicographical_compare(col_idx + row_ptr[a], col_idx + row_ptr[a + 1], col_idx + row_ptr[b],
                                        col_idx + row_ptr[b + 1]);
  });
  L->row_ptr.assign(size_t(cout) + 1, 0);
  for (int64_t q = 0; q < cout; ++q) {
    const int64_t o = order[size_t(q)], s = row_ptr[o], n = row_ptr[o + 1] - s;
    L->row_ptr[size_t(q) + 1] = L->row_ptr[size_t(q)] + n;
    L->col_idx.insert(L->col_idx.end(), col_idx + s, col_idx + s + n);
    L->W.insert(L->W.end(), W + s * kk, W + (s + n) * kk);
  }
  L->same = same_fan_in(g, L->row_ptr.data(), L->col_idx.data());
  if (channels_in_blocks(L->same) > channels_in_blocks(same)) {
    L->perm = std::move(order);
  } else {
    L->row_ptr.clear(), L->col_idx.clear(), L->W.clear(), L->same.clear();
  }
  std::lock_guard<std::mutex> lock(k.csc_mu);
  if (!k.regroup) k.regroup = L;
  return k.regroup;
}

// Moves each inner boundary of blocks of output channels forward to where a block of the kernels'
// walk from channel 0 starts, so that no thread's range splits a shared-fan-in block.
void snap_to_blocks(std::vector<int64_t>& bounds, const int32_t* same, int64_t cout) {
  std::vector<char> starts(size_t(cout) + 1, 0);
  walk_fan_in_blocks(same, cout, [&](int64_t o, bool) { starts[size_t(o)] = 1; });
  starts[size_t(cout)] = 1;
  for (size_t b = 1; b + 1 < bounds.size(); ++b) {
    int64_t o = std::max(bounds[b], bounds[b - 1]);
    while (o < cout && !starts[size_t(o)]) ++o;
    bounds[b] = o;
  }
}

// 1x1 convs: tasks are (image, group of pixel tiles, block of output channels).
struct PwJob {
  const Geom* g;
  const KernelFns* f;
  sparsify_conv::PwArgs a;  // x / y / z of image 0
  const float* X;
  float* xs;  // subsampled input of every image (strided convs), else nullptr
  int64_t npg, pix, nob;  // pixel groups per image, pixels per group, output-channel blocks
  const int64_t* bounds;
  // The input's channel planes of every image (N * Cin) when it comes in pieces; nullptr: X.
  const float* const* xc = nullptr;
  // Pre-activation tile buffers (nullptr: none): nslots of pack_floats, `busy` says which are in use.
  float* packs = nullptr;
  int64_t nslots = 0, pack_floats = 0;
  std::atomic<bool>* busy = nullptr;
};

void pw_task(void* ud, size_t i) {
  const PwJob& j = *static_cast<const PwJob*>(ud);
  const Geom& g = *j.g;
  const int64_t per = j.npg * j.nob, n = int64_t(i) / per, r = int64_t(i) % per;
  const int64_t pg = r / j.nob, b = r % j.nob, hwo = g.Ho * g.Wo;
  sparsify_conv::PwArgs a = j.a;
  a.x = j.xs != nullptr ? j.xs + n * g.Cin * hwo : j.X + n * g.Cin * g.H * g.W;
  if (j.xc != nullptr) a.xc = j.xc + n * g.Cin;
  a.y += n * g.Cout * hwo;
  if (a.z != nullptr) a.z += n * g.Cout * hwo;
  const int64_t p0 = pg * j.pix, p1 = p0 + j.pix < hwo ? p0 + j.pix : hwo;
  const int64_t slot = j.packs != nullptr ? claim_slot(j.busy, j.nslots) : -1;
  if (slot >= 0) a.pack = j.packs + slot * j.pack_floats;
  j.f->pointwise_block(a, j.bounds[b], j.bounds[b + 1], p0, p1);
  if (slot >= 0) j.busy[slot].store(false, std::memory_order_release);
}

struct Im2colJob {
  const Geom* g;
  const KernelFns* f;
  const float* X;
  float* out;
  int64_t per;  // input planes per task
};

void im2col_task(void* ud, size_t i) {
  const Im2colJob& j = *static_cast<const Im2colJob*>(ud);
  const Geom& g = *j.g;
  const int64_t planes = g.N * g.Cin, q = int64_t(i) * j.per, n = q + j.per < planes ? j.per : planes - q;
  j.f->im2col(g, j.X + q * g.H * g.W, j.out + q * g.kH * g.kW * g.Ho * g.Wo, n);
}

// Pixels per tile of a 1x1 conv: the tile's rows of all input channels of a group stay in L2
// while every output channel reads its connections' rows of it.
int64_t pw_tile(const Geom& g, int64_t VL) {
  int64_t t = kPwTileBytes / (4 * (g.cin_per_group > 0 ? g.cin_per_group : 1));
  t = t / (8 * VL) * (8 * VL);
  if (t < 8 * VL) t = 8 * VL;
  return t;
}

// Connections per input channel and block below which the CSC path loses to the per-connection
// one on planes of more than one vector (measured at 8x8 and 4x8).
constexpr int64_t kCscMinPerColumn = 16;

OrtStatus* parallel_for(OrtKernelContext* ctx, void (*fn)(void*, size_t), int64_t tasks, void* job) {
  if (tasks <= 0) return nullptr;
  if (tasks == 1) {
    fn(job, 0);
    return nullptr;
  }
  // num_batch = 0: ORT's simple parallel-for, one work item per task claimed dynamically by the
  // pool's threads. (Measured with ORT 1.31: num_batch = total ran every task on the calling
  // thread, so a 2-thread session computed on one core.)
  return g_api->KernelContext_ParallelFor(ctx, fn, size_t(tasks), 0, job);
}

// A kxk conv as the 1x1 conv over its input's K*K shifted copies (im2col): virtual input channel
// c * K*K + t holds input channel c shifted by tap t (zeros where the tap reads a pad), and
// connection (o, c) becomes K*K connections whose weights are the kernel's taps, already in that
// order in W ([nnz, kH, kW]). On small output planes with shared-fan-in blocks this runs the 1x1
// unit (four channels per loaded vector, the plane's left-over pixels across the block) where the
// direct paths waste lanes on short rows. The layout: the expanded row_ptr / col_idx.
struct Im2colLayout {
  std::vector<int64_t> row_ptr, col_idx;
  std::vector<float> wi;  // interleave_blocks over the expanded rows
};

// Output planes of 1 .. kIm2colVectors whole vectors and 1 .. kMaxTailPixels pixels more (7x7 on
// AVX-512) take the im2col path when their channels come in shared-fan-in blocks and their
// weights and indices are constant. Measured with --blocks 4, density 0.1 / 0.5, against the
// direct paths: 3x3 512@7 6.5x / 1.36x -> 8.0x / 1.9x of dense; planes of whole vectors lose
// (2x2, 4x4, 8x8: the kSmall3 / kTiny2 paths use every lane), and so do 14x14 ones.
constexpr int64_t kIm2colVectors = 4;

std::shared_ptr<const Im2colLayout> im2col_layout(const Kernel& k, const Geom& g, const float* W,
                                                  const int64_t* row_ptr, const int64_t* col_idx, const int32_t* same) {
  std::lock_guard<std::mutex> lock(k.csc_mu);
  if (!k.im2col) {
    auto L = std::make_shared<Im2colLayout>();
    const int64_t kk = g.kH * g.kW, nnz = row_ptr[g.Cout];
    L->row_ptr.resize(size_t(g.Cout) + 1);
    for (int64_t o = 0; o <= g.Cout; ++o) L->row_ptr[size_t(o)] = row_ptr[o] * kk;
    L->col_idx.resize(size_t(nnz * kk));
    for (int64_t q = 0; q < nnz; ++q)
      for (int64_t t = 0; t < kk; ++t) L->col_idx[size_t(q * kk + t)] = col_idx[q] * kk + t;
    L->wi = interleave_blocks(g, W, L->row_ptr.data(), same);
    k.im2col = L;
  }
  return k.im2col;
}

// The input's shifted copies for every image (KernelFns::im2col) in scratch memory `buf`: N * Cin
// * kH * kW planes of Ho x Wo.
OrtStatus* shifted_copies(const Kernel& k, OrtKernelContext* ctx, const Geom& g, const KernelFns* fns, const float* X,
                          Scratch* buf, float** out) {
  const int64_t plane = g.kH * g.kW * g.Ho * g.Wo;
  SPARSIFY_TRY(g_api->KernelContext_GetAllocator(ctx, k.cpu, &buf->alloc));
  buf->ptr = buf->alloc->Alloc(buf->alloc, size_t(g.N * g.Cin * plane) * sizeof(float));
  if (buf->ptr == nullptr) return g_api->CreateStatus(ORT_FAIL, "SparseConv: cannot allocate the shifted input copies");
  *out = static_cast<float*>(buf->ptr);
  Im2colJob j = {&g, fns, X, *out, (16384 + plane - 1) / plane};
  return parallel_for(ctx, im2col_task, (g.N * g.Cin + j.per - 1) / j.per, &j);
}

// 1x1 convs (any stride, no pads): strided ones first subsample their input into scratch memory,
// then tiles of pixels over blocks of output channels (see pointwise_block). same / wi: the
// shared-fan-in runs and the interleaved block weights (PwArgs), nullptr: none.
// misaligned: the input rows do not start on vector boundaries (see misaligned_rows); each
// tile's rows are then copied to aligned rows first where every task reads them often enough.
// vl: floats per vector of the unit `fns` (the aligned rows' multiple).
OrtStatus* run_pointwise(const Kernel& k, OrtKernelContext* ctx, const Geom& g, const KernelFns* fns,
                         const float* X, float* Y, const float* Z, const float* W, const int64_t* row_ptr,
                         const int64_t* col_idx, const float* B, int64_t nnz, const float* S, const float* T,
                         const int32_t* same, const float* wi, const float* const* xc = nullptr, bool misaligned = false,
                         int64_t vl = 16) {
  const int64_t hwo = g.Ho * g.Wo, VL = 64 / int64_t(sizeof(float));
  PwJob job;
  job.g = &g;
  job.f = fns;
  job.X = X;
  job.xs = nullptr;
  // Outputs larger than kStreamBytes (56x56 expansions at batch 8: 26 MB) would not stay in cache
  // for the next layer anyway: non-temporal stores save reading each output line before writing
  // it (1x1 64->2048 on 56x56: 4.2 -> 2.2 ms).
  const bool stream = g.N * g.Cout * hwo * int64_t(sizeof(float)) >= kStreamBytes;
  job.a = {X, Y, Z, W, row_ptr, col_idx, B, hwo, g.cin_per_group, g.cout_per_group, pw_tile(g, VL),
           {k.lo, k.hi, k.clamp ? 1 : 0, stream ? 1 : 0}, S, T, nullptr, 0, same, wi, nullptr};
  job.xc = xc;
  Scratch scratch;
  if (g.sH != 1 || g.sW != 1) {
    SPARSIFY_TRY(shifted_copies(k, ctx, g, fns, X, &scratch, &job.xs));
  }
  // Items: whole images on one thread; else about 4 per thread (8 when the thread count is
  // unknown) of at least kMinTaskWork multiply-adds: pixel groups first (each reads only its own
  // pixels of the input), blocks of output channels when the plane has too few tiles.
  const int64_t work = (nnz + g.Cout) * hwo;
  const int64_t items = k.threads > 0 ? 4 * k.threads : 8;
  int64_t want = k.threads == 1 ? 1 : (items + g.N - 1) / g.N;
  const int64_t cap = (work + kMinTaskWork - 1) / kMinTaskWork;
  if (want > cap) want = cap;
  if (want < 1) want = 1;
  const int64_t tile = job.a.tile, ntiles = (hwo + tile - 1) / tile;
  job.npg = want < ntiles ? want : ntiles;
  const int64_t tiles_per_group = (ntiles + job.npg - 1) / job.npg;
  job.pix = tiles_per_group * tile;
  job.npg = (ntiles + tiles_per_group - 1) / tiles_per_group;
  job.nob = (want + job.npg - 1) / job.npg;
  if (job.nob > g.Cout) job.nob = g.Cout;
  if (job.nob < 1) job.nob = 1;
  std::vector<int64_t> bounds = block_bounds(row_ptr, g.Cout, job.nob);
  if (job.a.same != nullptr) snap_to_blocks(bounds, job.a.same, g.Cout);
  job.bounds = bounds.data();
  // Pre-activation (or aligned) tiles: one buffer per running task, claimed like the padded
  // strips' buffers. Aligned copies pay where a task reads each of its input rows at least
  // kAlignMinReads times (nnz / Cin / blocks; one fan-in per output channel, see misaligned_rows).
  Scratch packs;
  std::unique_ptr<std::atomic<bool>[]> busy;
  const int64_t tasks = g.N * job.npg * job.nob;
  const bool align = misaligned && same == nullptr && nnz >= kAlignMinReads * g.Cin * job.nob;
  if (S != nullptr || align) {
    job.nslots = k.threads > 0 && k.threads < tasks ? k.threads : tasks;
    job.a.pack_stride = (std::min(job.a.tile, hwo) + vl - 1) / vl * vl;
    job.pack_floats = g.Cin * job.a.pack_stride;
    SPARSIFY_TRY(g_api->KernelContext_GetAllocator(ctx, k.cpu, &packs.alloc));
    packs.ptr = packs.alloc->Alloc(packs.alloc, size_t(job.nslots * job.pack_floats) * sizeof(float));
    if (packs.ptr == nullptr) return g_api->CreateStatus(ORT_FAIL, "SparseConv: cannot allocate the tile buffer");
    job.packs = static_cast<float*>(packs.ptr);
    busy.reset(new std::atomic<bool>[size_t(job.nslots)]);
    for (int64_t s = 0; s < job.nslots; ++s) busy[size_t(s)].store(false, std::memory_order_relaxed);
    job.busy = busy.get();
  }
  return parallel_for(ctx, pw_task, tasks, &job);
}

// Whether a 1x1 conv's input planes (hw pixels each from x on) do not all start on a vector
// boundary (vbytes): a load that straddles two vectors' worth of cache costs the load unit twice,
// and the per-channel 1x1 unit is bound by its loads. Copying each tile's rows to aligned rows
// first, measured on AVX-512 with one fan-in per output channel, 1 thread: 1x1 256->1024 and
// 1024->256 on 14x14 (784-byte planes) 1.08-1.25x faster at density 0.1 and 0.5, the strided
// 512->1024 to 14x14 1.14-1.19x, 56x56 planes from an input 16 bytes off alignment 1.05-1.26x
// where each row is read 25 times or more, 0.88-0.97x where 6 times (256->64 at 0.1: hence
// kAlignMinReads). Not with shared fan-ins (four FMAs per load: 0.94-1.02x). The aligned rows are
// as long as a tile or the plane rounded up to whole vectors (PwArgs::pack_stride): 7x7 rows a
// whole tile (512 bytes) apart fill only half of the cache sets, which cost the narrow unit
// (0.78-1.09x), where rows 56 floats apart gain (kNarrowAlignMaxDensity).
bool misaligned_rows(const float* x, int64_t hw, int64_t vbytes) {
  return (hw * int64_t(sizeof(float))) % vbytes != 0 || reinterpret_cast<uintptr_t>(x) % uintptr_t(vbytes) != 0;
}

// The pre-activation pass: `per` channel planes per task.
struct PreJob {
  const KernelFns* f;
  const float* X;
  const float* const* xc;  // the input's planes (N * Cin) when it comes in pieces, else nullptr
  float* out;
  const float* S;
  const float* T;
  int64_t cin, hw, planes, per;
};

void pre_task(void* ud, size_t i) {
  const PreJob& j = *static_cast<const PreJob*>(ud);
  const int64_t end = (int64_t(i) + 1) * j.per < j.planes ? (int64_t(i) + 1) * j.per : j.planes;
  for (int64_t q = int64_t(i) * j.per; q < end; ++q)
    j.f->scale_shift_relu(j.xc != nullptr ? j.xc[q] : j.X + q * j.hw, j.out + q * j.hw, j.hw, j.S[q % j.cin],
                          j.T[q % j.cin]);
}

// The fused MaxPool's pass (Kernel::pool_kernel): the conv writes its output to `conv`, then
// pool_task pools planes of it into `out`.
struct PoolJob {
  PoolJob() = default;
  PoolJob(const PoolJob&) = delete;  // owns `conv`
  PoolJob& operator=(const PoolJob&) = delete;
  const KernelFns* f = nullptr;
  const Kernel* k = nullptr;
  Scratch conv;
  const float* in = nullptr;
  float* out = nullptr;  // nullptr: no pool (or nothing to pool)
  int64_t planes = 0, per = 1, H = 0, W = 0, Ho = 0, Wo = 0;
};

void pool_task(void* ud, size_t i) {
  const PoolJob& j = *static_cast<const PoolJob*>(ud);
  const Kernel& k = *j.k;
  const int64_t end = (int64_t(i) + 1) * j.per < j.planes ? (int64_t(i) + 1) * j.per : j.planes;
  for (int64_t c = int64_t(i) * j.per; c < end; ++c)
    j.f->max_pool_plane(j.in + c * j.H * j.W, j.out + c * j.Ho * j.Wo, j.H, j.W, j.Ho, j.Wo, k.pool_kernel[0],
                        k.pool_kernel[1], k.pool_strides[0], k.pool_strides[1], k.pool_pads[0], k.pool_pads[1]);
}

OrtStatus* compute_impl(const Kernel& k, OrtKernelContext* ctx, PoolJob* pool) {
  size_t nin = 0;
  SPARSIFY_TRY(g_api->KernelContext_GetInputCount(ctx, &nin));
  const size_t nexpect = k.sum ? 6u : k.pre ? 7u : 5u;
  if (nin < (nexpect > 5 ? nexpect : 4u))
    return invalid(std::string("needs inputs X, W, row_ptr, col_idx") + (k.sum ? ", B, Z" : k.pre ? ", B, S, T" : "[, B]") +
                   "; got " + std::to_string(nin));
  TensorView t[7];
  const char* names[7] = {"X", "W", "row_ptr", "col_idx", "B", k.pre ? "S" : "Z", "T"};
  const ONNXTensorElementDataType types[7] = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  const size_t ranks[7] = {4, 3, 1, 1, 1, k.pre ? 1u : 4u, 1};
  for (size_t i = 0; i < nexpect && i < nin; ++i) {
    const OrtValue* v = nullptr;
    SPARSIFY_TRY(g_api->KernelContext_GetInput(ctx, i, &v));
    if (v == nullptr) {
      if (i == 4) continue;  // B is optional
      return invalid(std::string("input ") + names[i] + " is missing");
    }
    SPARSIFY_TRY(view(v, &t[i]));
    if (t[i].type != types[i])
      return invalid(std::string("input ") + names[i] + " has the wrong element type");
    if (t[i].dims.size() != ranks[i])
      return invalid(std::string("input ") + names[i] + " must have rank " +
                     std::to_string(ranks[i]) + ", got shape " + str(t[i].dims));
  }

  // The pre ops' further inputs 7..: X is the channel Concat of input 0 and these pieces.
  std::vector<TensorView> more(k.pre && nin > 7 ? nin - 7 : 0);
  int64_t more_channels = 0;
  for (size_t i = 0; i < more.size(); ++i) {
    const OrtValue* v = nullptr;
    SPARSIFY_TRY(g_api->KernelContext_GetInput(ctx, 7 + i, &v));
    const std::string what = "input " + std::to_string(7 + i) + " (piece " + std::to_string(i + 2) + " of X)";
    if (v == nullptr) return invalid(what + " is missing");
    SPARSIFY_TRY(view(v, &more[i]));
    const std::vector<int64_t>& d = more[i].dims;
    if (more[i].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return invalid(what + " has the wrong element type");
    if (d.size() != 4 || d[0] != t[0].dims[0] || d[2] != t[0].dims[2] || d[3] != t[0].dims[3])
      return invalid(what + " has shape " + str(d) + " but X has " + str(t[0].dims) +
                     "; the pieces must agree on every axis but the channel axis (1)");
    more_channels += d[1];
  }

  Geom g;
  std::memset(&g, 0, sizeof(g));
  g.N = t[0].dims[0];
  g.Cin = t[0].dims[1] + more_channels;
  g.H = t[0].dims[2];
  g.W = t[0].dims[3];
  const int64_t nnz = t[1].dims[0];
  g.kH = t[1].dims[1];
  g.kW = t[1].dims[2];
  g.Cout = t[2].dims[0] - 1;
  g.sH = k.strides[0];
  g.sW = k.strides[1];
  g.dH = k.dilations[0];
  g.dW = k.dilations[1];
  g.pt = k.pads[0];
  g.pl = k.pads[1];
  g.pb = k.pads[2];
  g.pr = k.pads[3];
  g.group = k.group;

  if (g.Cout < 0) return invalid("row_ptr must have Cout+1 >= 1 entries, got none");
  if (g.kH < 1 || g.kW < 1)
    return invalid("W must have shape [nnz, kH, kW] with kH, kW >= 1, got " + str(t[1].dims));
  if (g.Cin % g.group != 0 || g.Cout % g.group != 0)
    return invalid("group=" + std::to_string(g.group) + " must divide Cin=" +
                   std::to_string(g.Cin) + " and Cout=" + std::to_string(g.Cout) +
                   " (Cout = len(row_ptr) - 1)");
  g.cin_per_group = g.Cin / g.group;
  g.cout_per_group = g.group > 0 ? g.Cout / g.group : 0;
  if (t[3].dims[0] != nnz)
    return invalid("col_idx has " + std::to_string(t[3].dims[0]) + " entries but W has nnz=" +
                   std::to_string(nnz) + " kernels; they must match");
  const bool has_b = nin > 4 && t[4].value != nullptr;
  if (has_b && t[4].dims[0] != g.Cout)
    return invalid("B has " + std::to_string(t[4].dims[0]) + " entries, expected Cout=" +
                   std::to_string(g.Cout) + " (len(row_ptr) - 1)");
  const int64_t hk = (g.kH - 1) * g.dH + 1, wk = (g.kW - 1) * g.dW + 1;
  const int64_t hin = g.H + g.pt + g.pb, win = g.W + g.pl + g.pr;
  if (hin < hk || win < wk)
    return invalid("padded input " + std::to_string(hin) + "x" + std::to_string(win) +
                   " is smaller than the dilated kernel " + std::to_string(hk) + "x" +
                   std::to_string(wk));
  g.Ho = (hin - hk) / g.sH + 1;
  g.Wo = (win - wk) / g.sW + 1;

  const float* X = nullptr;
  const float* W = nullptr;
  const int64_t* row_ptr = nullptr;
  const int64_t* col_idx = nullptr;
  const float* B = nullptr;
  SPARSIFY_TRY(g_api->GetTensorData(t[0].value, reinterpret_cast<const void**>(&X)));
  SPARSIFY_TRY(g_api->GetTensorData(t[1].value, reinterpret_cast<const void**>(&W)));
  SPARSIFY_TRY(g_api->GetTensorData(t[2].value, reinterpret_cast<const void**>(&row_ptr)));
  SPARSIFY_TRY(g_api->GetTensorData(t[3].value, reinterpret_cast<const void**>(&col_idx)));
  if (has_b) SPARSIFY_TRY(g_api->GetTensorData(t[4].value, reinterpret_cast<const void**>(&B)));
  // With pieces: every image's input channel planes in Concat order (N * Cin pointers; empty: X
  // is one piece).
  std::vector<const float*> planes;
  if (!more.empty()) {
    const int64_t hw = g.H * g.W;
    planes.resize(size_t(g.N * g.Cin));
    int64_t c0 = 0;  // the piece's first channel in the concatenation
    for (size_t i = 0; i <= more.size(); ++i) {
      const TensorView& piece = i == 0 ? t[0] : more[i - 1];
      const float* d = nullptr;
      SPARSIFY_TRY(g_api->GetTensorData(piece.value, reinterpret_cast<const void**>(&d)));
      const int64_t c = piece.dims[1];
      for (int64_t n = 0; n < g.N; ++n)
        for (int64_t cc = 0; cc < c; ++cc) planes[size_t(n * g.Cin + c0 + cc)] = d + (n * c + cc) * hw;
      c0 += c;
    }
  }
  const float* S = nullptr;
  const float* T = nullptr;
  if (k.pre) {
    for (size_t i = 5; i < 7; ++i)
      if (t[i].dims[0] != g.Cin)
        return invalid(std::string("input ") + names[i] + " has " + std::to_string(t[i].dims[0]) +
                       " entries, expected one per input channel (" + std::to_string(g.Cin) + ")");
    SPARSIFY_TRY(g_api->GetTensorData(t[5].value, reinterpret_cast<const void**>(&S)));
    SPARSIFY_TRY(g_api->GetTensorData(t[6].value, reinterpret_cast<const void**>(&T)));
  }

  // The index arrays: CSR over output channels, columns within the group, no duplicates.
  // Constant index initializers are checked once (per input-channel count).
  const bool cached = row_ptr == k.const_row_ptr && col_idx == k.const_col_idx &&
                      k.validated_cpg.load(std::memory_order_acquire) == g.cin_per_group;
  if (!cached) {
  if (row_ptr[0] != 0) return invalid("row_ptr[0]=" + std::to_string(row_ptr[0]) + ", must be 0");
  for (int64_t o = 0; o < g.Cout; ++o)
    if (row_ptr[o + 1] < row_ptr[o])
      return invalid("row_ptr decreases at output channel " + std::to_string(o) + " (" +
                     std::to_string(row_ptr[o]) + " -> " + std::to_string(row_ptr[o + 1]) +
                     "); it must be non-decreasing");
  if (row_ptr[g.Cout] != nnz)
    return invalid("row_ptr[Cout]=" + std::to_string(row_ptr[g.Cout]) + " but W and col_idx have " +
                   std::to_string(nnz) + " entries; they must match");
  {
    std::vector<int64_t> seen(size_t(g.cin_per_group), -1);
    for (int64_t o = 0; o < g.Cout; ++o) {
      for (int64_t q = row_ptr[o]; q < row_ptr[o + 1]; ++q) {
        const int64_t c = col_idx[q];
        if (c < 0 || c >= g.cin_per_group)
          return invalid("col_idx[" + std::to_string(q) + "]=" + std::to_string(c) +
                         " (output channel " + std::to_string(o) + ") is outside [0, " +
                         std::to_string(g.cin_per_group) + "), the input channels of its group");
        if (seen[size_t(c)] == o)
          return invalid("output channel " + std::to_string(o) + " lists input channel " +
                         std::to_string(c) + " twice in col_idx");
        seen[size_t(c)] = o;
      }
    }
  }
  if (row_ptr == k.const_row_ptr && col_idx == k.const_col_idx)
    k.validated_cpg.store(g.cin_per_group, std::memory_order_release);
  }

  const int64_t ydims[4] = {g.N, g.Cout, g.Ho, g.Wo};
  const float* Z = nullptr;
  if (k.sum) {
    if (!std::equal(ydims, ydims + 4, t[5].dims.begin()))
      return invalid("the sum input Z has shape " + str(t[5].dims) + " but the output is " +
                     str(std::vector<int64_t>(ydims, ydims + 4)) + "; they must be equal (no broadcasting)");
    SPARSIFY_TRY(g_api->GetTensorData(t[5].value, reinterpret_cast<const void**>(&Z)));
  }
  int64_t odims[4] = {g.N, g.Cout, g.Ho, g.Wo};  // the op's output: ydims, or pooled
  if (!k.pool_kernel.empty()) {
    for (int a = 0; a < 2; ++a) {
      const int64_t span = ydims[2 + a] + k.pool_pads[size_t(a)] + k.pool_pads[size_t(a + 2)];
      if (span < k.pool_kernel[size_t(a)])
        return invalid("the conv output " + str(std::vector<int64_t>(ydims, ydims + 4)) + " with pool_pads=" +
                       str(k.pool_pads) + " is smaller than pool_kernel_shape=" + str(k.pool_kernel));
      odims[2 + a] = (span - k.pool_kernel[size_t(a)]) / k.pool_strides[size_t(a)] + 1;
    }
  }
  OrtValue* yv = nullptr;
  SPARSIFY_TRY(g_api->KernelContext_GetOutput(ctx, 0, odims, 4, &yv));
  float* Y = nullptr;
  SPARSIFY_TRY(g_api->GetTensorMutableData(yv, reinterpret_cast<void**>(&Y)));
  if (g.N == 0 || g.Cout == 0 || g.Ho * g.Wo == 0) return nullptr;
  if (!k.pool_kernel.empty()) {
    // The conv's output goes to scratch memory; compute() pools it into Y.
    SPARSIFY_TRY(g_api->KernelContext_GetAllocator(ctx, k.cpu, &pool->conv.alloc));
    pool->conv.ptr = pool->conv.alloc->Alloc(pool->conv.alloc, size_t(g.N * g.Cout * g.Ho * g.Wo) * sizeof(float));
    if (pool->conv.ptr == nullptr)
      return g_api->CreateStatus(ORT_FAIL, "SparseConv: cannot allocate the buffer of the conv output to pool");
    pool->f = g_wide.load(std::memory_order_relaxed);
    pool->k = &k;
    pool->in = static_cast<const float*>(pool->conv.ptr);
    pool->out = Y;
    pool->planes = g.N * g.Cout;
    pool->H = g.Ho, pool->W = g.Wo, pool->Ho = odims[2], pool->Wo = odims[3];
    Y = static_cast<float*>(pool->conv.ptr);
  }

  const KernelFns* fns = g_wide.load(std::memory_order_relaxed);
  Plan p;
  fns->make_plan(g, &p);
  // Narrow rows waste less with 8-float vectors, except on the paths that pack whole planes into
  // the widest vectors (small planes, 2x2; pointwise reads the plane as one flat run). The flat
  // 3x3 path packs two 8-float rows per 16-float vector; one row per 8-float vector of the narrow
  // unit runs faster (aligned row loads, 7 of 8 lanes used on 7x7: 512@7 at density 0.1, 0.54 ->
  // 0.36 ms).
  const bool narrow_rows = ((p.kind != sparsify_conv::kFlat3 && p.kind != sparsify_conv::kSmall3 &&
                             p.kind != sparsify_conv::kTiny2 && p.kind != sparsify_conv::kPointwise) ||
                            (p.kind == sparsify_conv::kFlat3 && p.P > 1)) && g.Wo <= 8;
  // 1x1 convs read the plane as one flat run: on small planes that leave at most half a vector
  // over (7x7: 49 = 3 x 16 + 1), the narrow unit's vectors waste fewer lanes (7 of 56 instead of 15
  // of 64), at the same lanes per cycle where 16-float FMAs are split in two (AMD Zen 4; see
  // splits_wide_vectors: elsewhere the wide unit's masked last vector is faster).
  // Not for runs of channels sharing a fan-in: the wide unit carries the left-over pixels across
  // each block (pw_block_tail; 1x1 512->2048 on 7x7, density 0.5: 0.66 -> 0.45 ms standalone).
  // The shared-fan-in runs of a 1x1 conv, looked up (or, for indices fed at run time, found) once.
  const auto pw_same = p.kind == sparsify_conv::kPointwise ? shared_runs(k, g, row_ptr, col_idx) : nullptr;
  const int64_t left_over = (g.Ho * g.Wo) % p.VL;
  const bool narrow_plane = g_split_wide.load(std::memory_order_relaxed) && pw_same &&
                            g.Ho * g.Wo <= kPwNarrowPixels && left_over != 0 && left_over <= p.VL / 2 &&
                            pw_same->empty();
  if (narrow_rows || narrow_plane) {
    fns = g_narrow.load(std::memory_order_relaxed);
    fns->make_plan(g, &p);
  }
  // The fused pre-activation: stride-1 1x1 convs apply it tile by tile (pointwise_block); other
  // paths read Relu(X * S + T) from scratch memory written in one pass here.
  const bool pw1 = p.kind == sparsify_conv::kPointwise && g.sH == 1 && g.sW == 1;
  // The pre-activation: every path then reads Relu(X * S + T) from scratch memory (one pass over
  // the input, where the separate BatchNormalization and Relu nodes took two).
  Scratch pre_scratch;
  if (k.pre && !pw1 && g.N * g.Cin * g.H * g.W > 0) {
    SPARSIFY_TRY(g_api->KernelContext_GetAllocator(ctx, k.cpu, &pre_scratch.alloc));
    pre_scratch.ptr = pre_scratch.alloc->Alloc(pre_scratch.alloc, size_t(g.N * g.Cin * g.H * g.W) * sizeof(float));
    if (pre_scratch.ptr == nullptr)
      return g_api->CreateStatus(ORT_FAIL, "SparseConv: cannot allocate the pre-activated input buffer");
    PreJob pj = {fns, X, planes.empty() ? nullptr : planes.data(), static_cast<float*>(pre_scratch.ptr), S, T, g.Cin,
                 g.H * g.W, g.N * g.Cin, 0};
    pj.per = (16384 + pj.hw - 1) / pj.hw;
    SPARSIFY_TRY(parallel_for(ctx, pre_task, (g.N * g.Cin + pj.per - 1) / pj.per, &pj));
    X = pj.out;
  }

  Job job = {&g, &p, fns, X, nullptr, Y, W, row_ptr, col_idx, B, 0, 0, nullptr, nullptr, 0, 0, 0, 0, nullptr, &k,
             Z, {k.lo, k.hi, k.clamp ? 1 : 0, 0}};
  // Work items are (image, block of output channels) or, for padded plans, (image, strip of
  // output rows), of about equal cost and claimed dynamically by the pool's threads: about 4
  // items per thread for load balance (8 when the thread count is unknown), each at least
  // kMinTaskWork multiply-adds (waking a pool thread costs ~10 us here), fewer when the batch
  // already gives enough items (whole images keep their input in cache); whole images on one
  // thread.
  const int64_t per_conn = g.Ho * g.Wo * g.kH * g.kW;
  const int64_t work = (nnz + g.Cout) * per_conn;
  int64_t nob = (work + kMinTaskWork - 1) / kMinTaskWork;
  const int64_t items = k.threads > 0 ? 4 * k.threads : 8;
  const int64_t want = k.threads == 1 ? 1 : (items + g.N - 1) / g.N;
  if (nob > want) nob = want;
  if (nob > g.Cout) nob = g.Cout;
  if (nob < 1) nob = 1;
  if (p.kind == sparsify_conv::kPointwise) {
    // Planes that leave a few pixels over whole vectors carry them across each block
    // (pw_block_tail), which reads the blocks' weights interleaved.
    const int64_t left = (g.Ho * g.Wo) % p.VL;
    const bool tail = left > 0 && left <= sparsify_conv::kMaxTailPixels;
    const int32_t* sr = pw_same->empty() ? nullptr : pw_same->data();
    const float* wi = sr != nullptr && tail ? interleaved_weights(k, g, W, row_ptr, col_idx, sr) : nullptr;
    // Strided convs read their subsampled copy (planes of Ho * Wo pixels from an aligned buffer).
    const bool misaligned = (!narrow_plane || nnz <= kNarrowAlignMaxDensity * double(g.cin_per_group * g.Cout)) &&
                            misaligned_rows(pw1 ? X : nullptr, g.Ho * g.Wo, p.VL * int64_t(sizeof(float)));
    return run_pointwise(k, ctx, g, fns, X, Y, Z, W, row_ptr, col_idx, B, nnz, pw1 && k.pre ? S : nullptr,
                         pw1 && k.pre ? T : nullptr, sr, wi, pw1 && !planes.empty() ? planes.data() : nullptr,
                         misaligned, p.VL);
  }
  // kxk convs with shared-fan-in blocks and constant weights on output planes of a few vectors
  // and a few pixels more: the 1x1 unit over the input's shifted copies (Im2colLayout).
  if (W == k.const_w && row_ptr == k.const_row_ptr && col_idx == k.const_col_idx) {
    Geom g1 = g;  // the 1x1 conv over the shifted copies
    g1.Cin = g.Cin * g.kH * g.kW;
    g1.cin_per_group = g.cin_per_group * g.kH * g.kW;
    g1.H = g.Ho;
    g1.W = g.Wo;
    g1.kH = g1.kW = g1.sH = g1.sW = g1.dH = g1.dW = 1;
    g1.pt = g1.pl = g1.pb = g1.pr = 0;
    const KernelFns* wide = g_wide.load(std::memory_order_relaxed);
    Plan p1;
    wide->make_plan(g1, &p1);
    const int64_t hwo = g.Ho * g.Wo, full = hwo / p1.VL, left = hwo % p1.VL;
    if (p1.kind == sparsify_conv::kPointwise && full >= 1 && full <= kIm2colVectors && left >= 1 &&
        left <= sparsify_conv::kMaxTailPixels) {
      const auto same = shared_runs(k, g, row_ptr, col_idx);
      if (!same->empty()) {
        const auto L = im2col_layout(k, g, W, row_ptr, col_idx, same->data());
        Scratch cols;
        float* xcol = nullptr;
        SPARSIFY_TRY(shifted_copies(k, ctx, g, wide, X, &cols, &xcol));
        return run_pointwise(k, ctx, g1, wide, xcol, Y, Z, W, L->row_ptr.data(), L->col_idx.data(), B,
                             nnz * g.kH * g.kW, nullptr, nullptr, same->data(), L->wi.data());
      }
    }
  }
  // Planes of whole vectors on the kSmall3 path go by input channel when that pays: always for
  // one-vector planes (4x4: the per-connection path spends six rotations per nine FMAs), for
  // larger ones when each input channel feeds enough connections of a block to amortise its
  // shifted copies (at 8x8, density 0.1, batch 1 in 8 blocks it does not: 0.054 vs 0.043 ms).
  if (p.kind == sparsify_conv::kSmall3 && fns->csc_block != nullptr && g.kH == 3 && g.kW == 3 &&
      (g.H * g.W) % p.VL == 0 && (p.V == 1 || nnz >= kCscMinPerColumn * nob * g.Cin)) {
    std::shared_ptr<const CscLayout> L;
    const bool constant = W == k.const_w && row_ptr == k.const_row_ptr && col_idx == k.const_col_idx;
    if (constant) {
      std::lock_guard<std::mutex> lock(k.csc_mu);
      for (const auto& c : k.csc)
        if (c->nb == nob && c->cin == g.Cin && c->cin_per_group == g.cin_per_group) L = c;
    }
    if (!L) {
      // Not under the lock: a concurrent first call may build the same layout twice, harmlessly.
      auto built = build_csc(g, W, row_ptr, col_idx, nob);
      L = built;
      if (constant) {
        std::lock_guard<std::mutex> lock(k.csc_mu);
        if (k.csc.size() >= 16) k.csc.clear();  // bounded: one per (block count, channel count)
        k.csc.push_back(built);
      }
    }
    job.nob = nob;
    job.csc = L.get();
    return parallel_for(ctx, csc_task, g.N * nob, &job);
  }
  const bool padded = !p.reads_x && g.Cin > 0;
  int64_t ns = 0, rows = 0, max_plane = p.plane;
  if (padded && nob > 1) {
    const int64_t T = k.threads > 0 ? k.threads : 2;
    ns = pick_strips(g, fns, T, 4 * T < nob ? 4 * T : nob, &rows, &max_plane);
  }
  // Planes whose padded copy exceeds kStripBytes go in strips of rows that fit (1 thread too):
  // each strip pads only its own input rows into a buffer that stays in L2 while every output
  // channel reads it. (Padding a whole 56x56 image first wrote and re-read 2 MB through L3: a
  // 3x3/s2 128-channel layer spent 0.25 of its 0.7 ms there.)
  if (padded && g.Cin * p.plane * int64_t(sizeof(float)) > kStripBytes) {
    const int64_t r = cache_strip_rows(g, fns, p);
    if (r < g.Ho && (ns == 0 || rows > r)) {
      int64_t mp = p.plane;
      if (strip_planes(g, fns, (g.Ho + r - 1) / r, r, &mp)) {
        ns = (g.Ho + r - 1) / r;
        rows = r;
        max_plane = mp;
      }
    }
  }
  if (ns > 0) nob = 1;
  // The kDirect path's block unit: runs of channels sharing a fan-in, whole in every task; where
  // regrouping the output channels makes more of them, the job walks the regrouped rows.
  std::shared_ptr<const std::vector<int32_t>> same;
  std::shared_ptr<const RegroupLayout> regroup;
  if (p.kind == sparsify_conv::kDirect && p.bcfg >= 0) {
    same = shared_runs(k, g, row_ptr, col_idx);
    regroup = regroup_layout(k, g, W, row_ptr, col_idx, *same);
    if (regroup != nullptr && !regroup->perm.empty()) {
      job.row_ptr = regroup->row_ptr.data();
      job.col_idx = regroup->col_idx.data();
      job.W = regroup->W.data();
      job.perm = regroup->perm.data();
      job.same = regroup->same.data();
    } else if (!same->empty()) {
      job.same = same->data();
    }
  }
  std::vector<int64_t> bounds = block_bounds(job.row_ptr, g.Cout, nob);
  if (job.same != nullptr) snap_to_blocks(bounds, job.same, g.Cout);
  job.nob = nob;
  job.bounds = bounds.data();
  job.ns = ns;
  job.rows = rows;
  // Padded input: one buffer per task that pads its own input (whole images or strips), or one
  // shared copy that pad tasks fill before output-channel blocks read it.
  const bool own = padded && (ns > 0 || nob == 1);
  job.nslots = own ? g.N * (ns > 0 ? ns : 1) : 0;
  // At most one buffer per thread is in use at a time (tasks claim the lowest free one).
  if (k.threads > 0 && job.nslots > k.threads) job.nslots = k.threads;
  job.slot = g.Cin * max_plane;
  Scratch scratch;
  if (padded) {
    SPARSIFY_TRY(g_api->KernelContext_GetAllocator(ctx, k.cpu, &scratch.alloc));
    const size_t bytes = size_t(own ? job.nslots * job.slot : g.N * g.Cin * p.plane) * sizeof(float);
    scratch.ptr = scratch.alloc->Alloc(scratch.alloc, bytes);
    if (scratch.ptr == nullptr)
      return g_api->CreateStatus(ORT_FAIL, "SparseConv: cannot allocate the padded input buffer");
    job.xp = static_cast<float*>(scratch.ptr);
    if (!own) {
      const int64_t planes = g.N * g.Cin;
      job.per = p.plane >= 16384 ? 1 : 16384 / p.plane;
      SPARSIFY_TRY(parallel_for(ctx, pad_task, (planes + job.per - 1) / job.per, &job));
    }
  }
  std::unique_ptr<std::atomic<bool>[]> busy;
  if (own) {
    busy.reset(new std::atomic<bool>[size_t(job.nslots)]);
    for (int64_t s = 0; s < job.nslots; ++s) busy[size_t(s)].store(false, std::memory_order_relaxed);
    job.busy = busy.get();
  }
  if (ns > 0) return parallel_for(ctx, strip_task, g.N * ns, &job);
  return parallel_for(ctx, conv_task, g.N * nob, &job);
}

OrtStatus* ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx) {
  try {
    const Kernel& k = *static_cast<const Kernel*>(kernel);
    PoolJob pool;
    SPARSIFY_TRY(compute_impl(k, ctx, &pool));
    if (pool.out == nullptr || pool.planes == 0 || pool.Ho * pool.Wo == 0) return nullptr;
    // Tasks of at least kMinTaskWork window reads.
    const int64_t per_plane = pool.Ho * pool.Wo * k.pool_kernel[0] * k.pool_kernel[1];
    pool.per = per_plane >= kMinTaskWork ? 1 : (kMinTaskWork + per_plane - 1) / per_plane;
    return parallel_for(ctx, pool_task, (pool.planes + pool.per - 1) / pool.per, &pool);
  } catch (const std::bad_alloc&) {
    return g_api->CreateStatus(ORT_FAIL, "SparseConv: out of memory");
  } catch (...) {
    return g_api->CreateStatus(ORT_FAIL, "SparseConv: unexpected internal error");
  }
}

// ---------------------------------------------------------------------------------------------
// The op description.

const char* ORT_API_CALL op_name(const OrtCustomOp* op) { return variant_of(op).name; }
const char* ORT_API_CALL op_ep(const OrtCustomOp*) { return "CPUExecutionProvider"; }
ONNXTensorElementDataType ORT_API_CALL op_input_type(const OrtCustomOp*, size_t i) {
  // Inputs 2, 3 (row_ptr, col_idx) are int64; the rest float (the pre ops' pieces at 7 too).
  return (i == 2 || i == 3) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
                            : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
size_t ORT_API_CALL op_input_count(const OrtCustomOp* op) { return variant_of(op).inputs + (variant_of(op).pre ? 1 : 0); }
ONNXTensorElementDataType ORT_API_CALL op_output_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
size_t ORT_API_CALL op_output_count(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL op_input_char(const OrtCustomOp* op, size_t i) {
  if (i == 4) return INPUT_OUTPUT_OPTIONAL;
  return i >= variant_of(op).inputs ? INPUT_OUTPUT_VARIADIC : INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL op_output_char(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL op_input_mem(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL op_one(const OrtCustomOp*) { return 1; }
int ORT_API_CALL op_zero(const OrtCustomOp*) { return 0; }
int ORT_API_CALL op_end_version(const OrtCustomOp*) { return INT_MAX; }

SparseOp make_op(const OpVariant* variant) {
  SparseOp sop;
  std::memset(&sop, 0, sizeof(sop));
  sop.variant = variant;
  OrtCustomOp& op = sop.op;
  op.version = ORT_API_VERSION;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_ep;
  op.GetInputType = op_input_type;
  op.GetInputTypeCount = op_input_count;
  op.GetOutputType = op_output_type;
  op.GetOutputTypeCount = op_output_count;
  op.KernelDestroy = destroy_kernel;
  op.GetInputCharacteristic = op_input_char;
  op.GetOutputCharacteristic = op_output_char;
  op.GetInputMemoryType = op_input_mem;
  op.GetVariadicInputMinArity = op_zero;  // the pre ops' further input pieces: none or more
  op.GetVariadicInputHomogeneity = op_zero;
  op.GetVariadicOutputMinArity = op_one;
  op.GetVariadicOutputHomogeneity = op_zero;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.GetStartVersion = op_one;
  op.GetEndVersion = op_end_version;
  return sop;
}

struct SparseOps {
  SparseOp ops[kNumVariants];
  SparseOps() {
    for (size_t i = 0; i < kNumVariants; ++i) ops[i] = make_op(&kVariants[i]);
  }
};
const SparseOps g_ops;

// Every RegisterCustomOps call (one per session options that load the library) gets its own
// domain object; ORT does not take ownership, so they live until the library is unloaded.
struct DomainKeeper {
  std::mutex mu;
  std::vector<OrtCustomOpDomain*> domains;
  ~DomainKeeper() {
    if (g_api != nullptr)
      for (OrtCustomOpDomain* d : domains) g_api->ReleaseCustomOpDomain(d);
  }
};
DomainKeeper g_domains;

}  // namespace

extern "C" {

SPARSIFY_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                         const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    const OrtApi* api1 = api_base->GetApi(1);
    std::string msg = "the sparsify SparseConv library needs ONNX Runtime API version " +
                      std::to_string(ORT_API_VERSION) + " (onnxruntime >= 1." +
                      std::to_string(ORT_API_VERSION) + "); this runtime is " +
                      api_base->GetVersionString();
    return api1 != nullptr ? api1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  g_api = api;
  const KernelFns* narrow = nullptr;
  const KernelFns* wide = nullptr;
  select_kernels(&narrow, &wide);
  g_narrow.store(narrow, std::memory_order_relaxed);
  g_wide.store(wide, std::memory_order_relaxed);
  g_split_wide.store(splits_wide_vectors(), std::memory_order_relaxed);
  OrtCustomOpDomain* domain = nullptr;
  SPARSIFY_TRY(api->CreateCustomOpDomain(kDomain, &domain));
  OrtStatus* st = nullptr;
  for (size_t i = 0; i < kNumVariants && st == nullptr; ++i) st = api->CustomOpDomain_Add(domain, &g_ops.ops[i].op);
  if (st == nullptr) st = api->AddCustomOpDomain(options, domain);
  if (st != nullptr) {
    api->ReleaseCustomOpDomain(domain);
    return st;
  }
  std::lock_guard<std::mutex> lock(g_domains.mu);
  g_domains.domains.push_back(domain);
  return nullptr;
}

// Describes the build for `sparsify runtime info` (read with ctypes; no ORT needed).
SPARSIFY_EXPORT const char* SparsifyKernelInfo(void) {
  const KernelFns* narrow = nullptr;
  const KernelFns* wide = nullptr;
  select_kernels(&narrow, &wide);
  static std::string info;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  info = std::string("api_version=") + std::to_string(ORT_API_VERSION) + ";isa=" + wide->isa +
         (wide != narrow ? std::string("+") + narrow->isa : std::string()) + ";op=";
  for (size_t i = 0; i < kNumVariants; ++i) info += (i ? "," : "") + std::string(kDomain) + "::" + kVariants[i].name;
  info += ";since_version=1";
  return info.c_str();
}

}  // extern "C"
