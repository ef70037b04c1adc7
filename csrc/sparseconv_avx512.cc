// AVX-512F kernels (32 vector registers, 16 floats per vector): compiled with -mavx512f
// -mfma (see setup.py); sparseconv_op.cc uses them only when the CPU reports AVX-512F and the
// output rows are wider than 8 (narrower planes waste less with the AVX2 width).
#if !defined(__AVX512F__)
#error "sparseconv_avx512.cc must be compiled with -mavx512f"
#endif
#define SPARSIFY_ISA_NS isa_avx512
#define SPARSIFY_ISA_NAME "avx512"
#define SPARSIFY_VBYTES 64
#define SPARSIFY_NREGS 32
#define SPARSIFY_ENTRY avx512_kernels
#include "sparseconv_kernel.h"
