// The avx2 build of the CPU kernel (flags set per file in CMakeLists.txt).
#define RECO_LEVEL_NS avx2
#define RECO_VW 8
#include "retrieve_attend_impl.h"

// After the kernel, whose vector types the machine-limit loops use.
#include "machine_limits_impl.h"
