// AVX-512VL kernels at the AVX2 width (8 floats) with 32 vector registers, for planes whose
// rows are too narrow for 16-float vectors. Compiled with -mavx512f
// -mavx512vl (see setup.py); used only when the CPU reports both.
#if !defined(__AVX512F__) || !defined(__AVX512VL__)
#error "sparseconv_avx512y.cc must be compiled with -mavx512f -mavx512vl"
#endif
#define SPARSIFY_ISA_NS isa_avx512y
#define SPARSIFY_ISA_NAME "avx512vl-256"
#define SPARSIFY_VBYTES 32
#define SPARSIFY_NREGS 32
#define SPARSIFY_ENTRY avx512y_kernels
#include "sparseconv_kernel.h"
