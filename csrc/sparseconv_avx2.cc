// AVX2+FMA kernels: this file alone is compiled with -mavx2 -mfma -ffp-contract=fast (see
// setup.py); sparseconv_op.cc calls into it only when the CPU reports both features.
#if !defined(__AVX2__) || !defined(__FMA__)
#error "sparseconv_avx2.cc must be compiled with -mavx2 -mfma"
#endif
#define SPARSIFY_ISA_NS isa_avx2
#define SPARSIFY_ISA_NAME "avx2"
#define SPARSIFY_VBYTES 32
#define SPARSIFY_NREGS 16
#define SPARSIFY_ENTRY avx2_kernels
#include "sparseconv_kernel.h"
