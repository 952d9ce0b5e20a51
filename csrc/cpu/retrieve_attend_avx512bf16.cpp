// The avx512 build of the CPU kernel plus vdpbf16ps tiles for bfloat16 queries x bfloat16 keys
// (flags set per file in CMakeLists.txt).
#define RECO_LEVEL_NS avx512bf16
#define RECO_VW 16
#define RECO_BF16_DOT 1
#include "retrieve_attend_impl.h"

// After the kernel, whose vector types the machine-limit loops use.
#include "machine_limits_impl.h"
