// The neon build of the CPU kernel for arm64: 4-lane float vectors (Advanced SIMD, which every
// AArch64 CPU has, so no extra flags), with 16-bit keys widened by the vector instructions.
#define RECO_LEVEL_NS neon
#define RECO_VW 4
#define RECO_NEON 1
#include "retrieve_attend_impl.h"

// After the kernel, whose vector types the machine-limit loops use.
#include "machine_limits_impl.h"
