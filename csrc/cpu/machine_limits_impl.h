// One SIMD level's loops behind machine_limits.h, included by each retrieve_attend_<level>.cpp
// after retrieve_attend_impl.h (whose vector types it uses).
#pragma once
#include <omp.h>

#include <chrono>
#include <cstring>

#include "machine_limits.h"

namespace reco::cpu::RECO_LEVEL_NS {
namespace {

// Independent accumulators: enough to cover the FMA latency times the FMA ports of every CPU the
// levels run on (4 cycles x 2 ports = 8 in flight), few enough to stay in 16 registers.
constexpr int kChains = 12;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Keeps a result alive without a store the loops would wait on.
volatile float limits_sink;
volatile uint32_t limits_read_sink;

double fma_seconds(int threads, int64_t iters) {
  const auto t0 = std::chrono::steady_clock::now();
  float total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    // x <- x * a + b converges to b / (1 - a) = 1: every value stays normal.
    const vf a = vf{} + 0.999f, b = vf{} + 0.001f;
    vf acc[kChains];
    for (int i = 0; i < kChains; ++i) acc[i] = vf{} + (1.0f + 0.01f * i);
    for (int64_t it = 0; it < iters; ++it)
      for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * a + b;
    for (int i = 0; i < kChains; ++i) total += hsum(acc[i]);
  }
  const double s = seconds_since(t0);
  limits_sink = total;
  return s;
}

#if defined(RECO_BF16_DOT)
double dot_seconds(int threads, int64_t iters) {
  const auto t0 = std::chrono::steady_clock::now();
  float total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    // Products of 2^-8 and 1: sums stay far from overflow for any iteration count used.
    const __m512bh a =
        _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.00390625f), _mm512_set1_ps(0.00390625f));
    const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.0f), _mm512_set1_ps(1.0f));
    __m512 acc[kChains];
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(1.0f + i);
    for (int64_t it = 0; it < iters; ++it)
      for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    for (int i = 0; i < kChains; ++i) total += hsum(reinterpret_cast<const vf&>(acc[i]));
  }
  const double s = seconds_since(t0);
  limits_sink = total;
  return s;
}
#endif

double read_pass_seconds(const void* data, int64_t n, int threads) {
  const char* bytes = static_cast<const char*>(data);
  constexpr int64_t kStep = 4 * VW * 4;  // four vectors of 32-bit words
  const auto t0 = std::chrono::steady_clock::now();
  uint32_t total = 0;
#pragma omp parallel num_threads(threads) reduction(^ : total)
  {
    const int t = omp_get_thread_num();
    const int64_t per = round_up((n + threads - 1) / threads, kStep);
    const int64_t b0 = std::min(n, t * per), b1 = std::min(n, b0 + per);
    vu32 acc[4] = {};
    int64_t i = b0;
    for (; i + kStep <= b1; i += kStep)
      for (int j = 0; j < 4; ++j) acc[j] ^= *reinterpret_cast<const vu32*>(bytes + i + j * VW * 4);
    uint32_t x = 0;
    for (; i < b1; ++i) x ^= static_cast<unsigned char>(bytes[i]);
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < VW; ++l) x ^= acc[j][l];
    total ^= x;
  }
  const double s = seconds_since(t0);
  limits_read_sink = total;
  return s;
}

}  // namespace

detail::LimitLoops limit_loops() {
  detail::LimitLoops l{};
  l.fma_seconds = fma_seconds;
  l.fma_macs_per_step = int64_t(kChains) * VW;
#if defined(RECO_BF16_DOT)
  l.dot_seconds = dot_seconds;
  l.dot_macs_per_step = int64_t(kChains) * VW * 2;
#endif
  l.read_seconds = read_pass_seconds;
  return l;
}

}  // namespace reco::cpu::RECO_LEVEL_NS
