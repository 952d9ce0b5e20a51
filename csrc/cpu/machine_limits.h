// The machine's own limits at each SIMD level, for benchmarks/ to print beside every figure (not
// part of the op): the multiply-add peak of the level's vectors and the rate of one read pass.
#pragma once
#include <cstdint>

#include "retrieve_attend.h"

namespace reco::cpu {

// Multiply-adds per second of `threads` threads, each running independent chains of the level's
// float32 vector FMA (generic: multiply then add), timed for about `seconds`; the best of 3.
// bf16_dot: the vdpbf16ps rate instead (2 multiply-adds a lane), 0 at a level without it.
double fma_rate(Level level, int threads, double seconds, bool bf16_dot);
// Seconds of one pass of `threads` threads reading bytes [0, n) of data with the level's vector
// loads, each thread a contiguous range (as the search splits the keys).
double read_seconds(Level level, const void* data, int64_t n, int threads);

namespace detail {
// One level's loops (machine_limits_impl.h): `iters` steps of every chain on each thread.
struct LimitLoops {
  double (*fma_seconds)(int threads, int64_t iters);
  int64_t fma_macs_per_step;                          // per thread
  double (*dot_seconds)(int threads, int64_t iters);  // null without vdpbf16ps
  int64_t dot_macs_per_step;
  double (*read_seconds)(const void* data, int64_t n, int threads);
};
}  // namespace detail

namespace generic {
detail::LimitLoops limit_loops();
}
namespace avx2 {
detail::LimitLoops limit_loops();
}
namespace avx512 {
detail::LimitLoops limit_loops();
}
namespace avx512bf16 {
detail::LimitLoops limit_loops();
}
namespace neon {
detail::LimitLoops limit_loops();
}

}  // namespace reco::cpu
