// Portable kernels: built with the compiler's baseline flags (SSE2 on x86_64, NEON on arm64).
#define SPARSIFY_ISA_NS isa_base
#define SPARSIFY_ISA_NAME "baseline"
#define SPARSIFY_VBYTES 16
#define SPARSIFY_NREGS 16
#define SPARSIFY_ENTRY base_kernels
#include "sparseconv_kernel.h"
