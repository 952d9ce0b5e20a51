// The level dispatch and timing of machine_limits.h.
#include "machine_limits.h"

#include <algorithm>
#include <stdexcept>

namespace reco::cpu {
namespace {

detail::LimitLoops loops(Level level) {
  switch (level) {
#if defined(RECO_HAVE_AVX512BF16)
    case Level::avx512bf16: return avx512bf16::limit_loops();
#endif
#if defined(RECO_HAVE_AVX512)
    case Level::avx512: return avx512::limit_loops();
#endif
#if defined(RECO_HAVE_AVX2)
    case Level::avx2: return avx2::limit_loops();
#endif
#if defined(RECO_HAVE_NEON)
    case Level::neon: return neon::limit_loops();
#endif
    default: return generic::limit_loops();
  }
}

}  // namespace

double fma_rate(Level level, int threads, double seconds, bool bf16_dot) {
  if (threads < 1) throw std::invalid_argument("num_threads must be >= 1");
  if (!(seconds > 0)) throw std::invalid_argument("seconds must be > 0");
  const detail::LimitLoops l = loops(level);
  double (*run)(int, int64_t) = bf16_dot ? l.dot_seconds : l.fma_seconds;
  if (run == nullptr) return 0.0;
  const int64_t per_step = bf16_dot ? l.dot_macs_per_step : l.fma_macs_per_step;
  // Grow the step count until one run takes a third of the time asked for; then the best of 3.
  int64_t iters = 1 << 12;
  while (run(threads, iters) < seconds / 3 && iters < (int64_t(1) << 40)) iters *= 2;
  double best = 0;
  for (int r = 0; r < 3; ++r)
    best = std::max(best, double(iters) * per_step * threads / run(threads, iters));
  return best;
}

double read_seconds(Level level, const void* data, int64_t n, int threads) {
  if (threads < 1) throw std::invalid_argument("num_threads must be >= 1");
  if (n < 0) throw std::invalid_argument("the byte count must be >= 0");
  return loops(level).read_seconds(data, n, threads);
}

}  // namespace reco::cpu
