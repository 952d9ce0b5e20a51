// Runs the tensor-core search of csrc/cuda/search_mma.cu, compiled against the emulation shim, on
// random keys and queries, and checks each split's top-k against exact float64 scores: rows in
// the split, not excluded, distinct, best first, each score within float32 accumulation error of
// the exact one, and no row left out that beats the list's last by more than that error.
// Usage: search_mma_check <f16|f16x2|bf16|bf16x3|s8> <sm_80|sm_90>; prints "ok" or FAIL.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/common.cuh"

namespace {

int fail(const std::string& what) {
  std::printf("FAIL: %s\n", what.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return fail("usage: search_mma_check TYPE ARCH");
  const std::string type = argv[1];
  if (!reco::emu::set_arch(argv[2])) return fail("unknown arch");
  const bool s8 = type == "s8", bf16 = type.rfind("bf16", 0) == 0;
  const int terms = type == "f16x2" ? 2 : type == "bf16x3" ? 3 : 1;
  std::mt19937 gen(unsigned(type.size()) * 977u + unsigned(terms));
  std::uniform_real_distribution<float> u(-1.f, 1.f);

  // 70 queries: two query blocks, the second partial; 700 rows in 2 splits of 350 (a full and a
  // partial 256-row tile each); d of 40 16-bit units: a full and a zero-filled chunk of 32.
  const int64_t B = 70, N = 700, units = 40, k = 10, S = 2, E = 3;
  const int64_t d = s8 ? 2 * units : units;  // elements
  const int64_t rows_per_split = (N + S - 1) / S;
  std::vector<uint16_t> keys(size_t(N * units)), query(size_t(terms * B * units));
  std::vector<double> K(size_t(N * d)), Q(size_t(B * d), 0.0);  // as numbers
  std::vector<float> scales(static_cast<size_t>(N));
  // Stores a random 16-bit unit at dst[i] and its value(s) at val[j] (and val[j + 1] for int8).
  auto put = [&](std::vector<uint16_t>& dst, size_t i, std::vector<double>& val, size_t j) {
    if (s8) {
      const int lo = int(gen() % 255) - 127, hi = int(gen() % 255) - 127;
      dst[i] = uint16_t(uint8_t(int8_t(lo)) | uint8_t(int8_t(hi)) << 8);
      val[j] = lo;
      val[j + 1] = hi;
      return;
    }
    const float x = u(gen);
    dst[i] = bf16 ? __bfloat16_as_ushort(__float2bfloat16(x)) : __half_as_ushort(__float2half(x));
    val[j] = bf16 ? __bfloat162float(__ushort_as_bfloat16(dst[i]))
                  : __half2float(__ushort_as_half(dst[i]));
  };
  const size_t per = s8 ? 2 : 1;  // values per unit
  for (size_t i = 0; i < keys.size(); ++i) put(keys, i, K, per * i);
  for (int t = 0; t < terms; ++t) {
    std::vector<double> part(size_t(B * d));
    for (int64_t i = 0; i < B * units; ++i)
      put(query, size_t(t * B * units + i), part, per * size_t(i));
    const double scale = std::ldexp(1.0, -8 * t);  // later terms are smaller, as split terms are
    for (int64_t i = 0; i < B * units; ++i) {
      if (!s8 && t > 0) {  // rescale the stored term and its value
        const float x = float(part[size_t(i)] * scale);
        uint16_t& h = query[size_t(t * B * units + i)];
        h = bf16 ? __bfloat16_as_ushort(__float2bfloat16(x)) : __half_as_ushort(__float2half(x));
        part[size_t(i)] = bf16 ? __bfloat162float(__ushort_as_bfloat16(h))
                               : __half2float(__ushort_as_half(h));
      }
    }
    for (size_t i = 0; i < part.size(); ++i) Q[i] += part[i];
  }
  for (auto& s : scales) s = 0.5f + u(gen) * 0.25f;
  std::vector<int64_t> exclude(size_t(B * E));
  for (auto& e : exclude) e = int64_t(gen() % uint32_t(N));
  exclude[0] = -1;  // padding

  std::vector<float> part_scores(size_t(B * S * k), NAN);
  std::vector<int64_t> part_rows(size_t(B * S * k), -7);
  reco::cuda::SearchArgs a{query.data(), terms,   B,       d,         keys.data(),       N,
                           d,            s8,      s8 ? scales.data() : nullptr, exclude.data(),
                           nullptr,      E,            k,       rows_per_split,     part_scores.data(),
                           part_rows.data(),      int(S),  nullptr};
  try {
    reco::cuda::search_mma(a, bf16);
  } catch (const std::exception& e) {
    std::printf("ERROR: %s\n", e.what());
    return 3;
  }

  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> exact(static_cast<size_t>(N)), mag(static_cast<size_t>(N));
    for (int64_t r = 0; r < N; ++r) {
      double s = 0, m = 0;
      for (int64_t c = 0; c < d; ++c) {
        s += Q[size_t(b * d + c)] * K[size_t(r * d + c)];
        m += std::fabs(Q[size_t(b * d + c)] * K[size_t(r * d + c)]);
      }
      // int8: float32(dot) * scale, as the kernel and reference.coarse_scores compute it.
      exact[size_t(r)] = s8 ? double(float(s) * scales[size_t(r)]) : s;
      mag[size_t(r)] = (s8 ? 0.0 : m * 1e-6) + 1e-30;
    }
    auto excluded = [&](int64_t r) {
      for (int64_t e = 0; e < E; ++e)
        if (exclude[size_t(b * E + e)] == r) return true;
      return false;
    };
    for (int64_t sp = 0; sp < S; ++sp) {
      const int64_t n0 = sp * rows_per_split, n1 = std::min(N, n0 + rows_per_split);
      std::set<int64_t> seen;
      double last = INFINITY;
      for (int64_t j = 0; j < k; ++j) {
        const size_t o = size_t((b * S + sp) * k + j);
        const int64_t r = part_rows[o];
        const std::string at = "query " + std::to_string(b) + " split " + std::to_string(sp) +
                               " entry " + std::to_string(j);
        if (r < n0 || r >= n1) return fail(at + ": row " + std::to_string(r) + " outside split");
        if (excluded(r)) return fail(at + ": excluded row " + std::to_string(r));
        if (!seen.insert(r).second) return fail(at + ": row twice");
        if (!(std::fabs(part_scores[o] - exact[size_t(r)]) <= mag[size_t(r)]))
          return fail(at + ": score " + std::to_string(part_scores[o]) + " != exact " +
                      std::to_string(exact[size_t(r)]));
        if (double(part_scores[o]) > last) return fail(at + ": not best first");
        last = part_scores[o];
      }
      for (int64_t r = n0; r < n1; ++r)
        if (!seen.count(r) && !excluded(r) && exact[size_t(r)] > last + 2 * mag[size_t(r)])
          return fail("query " + std::to_string(b) + " split " + std::to_string(sp) + ": row " +
                      std::to_string(r) + " (" + std::to_string(exact[size_t(r)]) +
                      ") beats the list's last (" + std::to_string(last) + ")");
    }
  }
  std::printf("ok: %s on %s, %lld queries x %lld rows\n", type.c_str(), argv[2],
              static_cast<long long>(B), static_cast<long long>(N));
  return 0;
}
