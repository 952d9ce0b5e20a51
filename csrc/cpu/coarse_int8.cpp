// The coarse search of fused_retrieve_attend_int8 on CPU: for each query, the `candidates` rows
// of best coarse score float32(query_codes . codes[n]) * scales[n] (float32 product), in the
// contract's order (higher first, ties to the lower row, NaN last), excluded rows never. The
// integer dot product is exact, so the scores equal reference.coarse_scores bit for bit.
//
// Threads split the rows; each keeps a bounded heap per query; the heaps are merged at the end.
// Rows are walked in blocks that stay in L2 while every query of the pass scores them, 4 rows at
// a time. The dot product uses AVX512-VNNI (vpdpbusd, u8 x s8: the query is offset by 128 into
// u8 and 128 * sum(codes row) is subtracted) where the CPU has it and the SIMD level in use
// (RECO_CPU_LEVEL) is an AVX-512 one, else AVX2 (int16 vpmaddwd) at the avx2 level or above,
// else a plain integer loop.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "exclusions.h"
#include "fp_mode.h"
#include "reco/topk.h"
#include "retrieve_attend.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers initialise _mm512_undefined_*() from themselves: a false warning.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif
#define RECO_VNNI 1
#endif

namespace reco::cpu {
namespace {

constexpr int64_t kBlockRows = 256;  // rows scored by every query of a pass before moving on

// dots[i] = q . k_i for 4 rows (exact int32).
void dots4_generic(const int8_t* q, const int8_t* const* k, int64_t d, int32_t* dots) {
  for (int i = 0; i < 4; ++i) {
    int32_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < d; ++j) s += int32_t(q[j]) * int32_t(k[i][j]);
    dots[i] = s;
  }
}

#if defined(RECO_VNNI)
__attribute__((target("avx512f"))) int32_t sum_lanes(__m512i v) {
  alignas(64) int32_t lanes[16];
  _mm512_store_si512(lanes, v);
  int32_t s = 0;
  for (int i = 0; i < 16; ++i) s += lanes[i];
  return s;
}

// The 16-lane sums of a[0..3] at once: pairs interleaved within 128-bit lanes, then the four
// 128-bit lanes added together.
__attribute__((target("avx512f"))) void sum_lanes4(const __m512i (&a)[4], int32_t* out) {
  const __m512i s01 =
      _mm512_add_epi32(_mm512_unpacklo_epi32(a[0], a[1]), _mm512_unpackhi_epi32(a[0], a[1]));
  const __m512i s23 =
      _mm512_add_epi32(_mm512_unpacklo_epi32(a[2], a[3]), _mm512_unpackhi_epi32(a[2], a[3]));
  __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
  t = _mm512_add_epi32(t, _mm512_shuffle_i32x4(t, t, _MM_SHUFFLE(1, 0, 3, 2)));
  t = _mm512_add_epi32(t, _mm512_shuffle_i32x4(t, t, _MM_SHUFFLE(2, 3, 0, 1)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_castsi512_si128(t));
}

// qu = q + 128 (u8); ksum[i] = sum of row i. Tail elements past d load as zero on both sides.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void dots4_vnni(const uint8_t* qu,
                                                                       const int8_t* const* k,
                                                                       const int32_t* ksum,
                                                                       int64_t d, int32_t* dots) {
  __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                    _mm512_setzero_si512()};
  int64_t j = 0;
  for (; j + 64 <= d; j += 64) {
    const __m512i qv = _mm512_loadu_si512(qu + j);
    for (int i = 0; i < 4; ++i)
      acc[i] = _mm512_dpbusd_epi32(acc[i], qv, _mm512_loadu_si512(k[i] + j));
  }
  if (j < d) {
    const __mmask64 m = _cvtu64_mask64((~0ULL) >> (64 - (d - j)));
    const __m512i qv = _mm512_maskz_loadu_epi8(m, qu + j);
    for (int i = 0; i < 4; ++i)
      acc[i] = _mm512_dpbusd_epi32(acc[i], qv, _mm512_maskz_loadu_epi8(m, k[i] + j));
  }
  sum_lanes4(acc, dots);
  for (int i = 0; i < 4; ++i) dots[i] -= 128 * ksum[i];
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) int32_t row_sum_vnni(const int8_t* k,
                                                                            int64_t d) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc = _mm512_setzero_si512();
  int64_t j = 0;
  for (; j + 64 <= d; j += 64) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(k + j));
  if (j < d) {
    const __mmask64 m = _cvtu64_mask64((~0ULL) >> (64 - (d - j)));
    acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(m, k + j));
  }
  return sum_lanes(acc);
}

// dots[i] = q . k_i for 4 rows with AVX2: int8 widened to int16, vpmaddwd (a pair of products
// is at most 2 * 127^2, exact in int32).
__attribute__((target("avx2"))) void dots4_avx2(const int8_t* q, const int8_t* const* k, int64_t d,
                                                int32_t* dots) {
  __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                    _mm256_setzero_si256()};
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const __m256i qv =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
    for (int i = 0; i < 4; ++i) {
      const __m256i kv =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k[i] + j)));
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(qv, kv));
    }
  }
  for (int i = 0; i < 4; ++i) {
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[i]);
    int32_t s = 0;
    for (int l = 0; l < 8; ++l) s += lanes[l];
    for (int64_t t = j; t < d; ++t) s += int32_t(q[t]) * int32_t(k[i][t]);
    dots[i] = s;
  }
}

// A block of rows laid out for many queries: group g of 4 bytes of 16 consecutive rows in one
// 64-byte vector (lane = row), so that vpdpbusd with the query's group g broadcast scores 16 rows
// at once. Rows past the block are zero; ksum16 gets each row's sum of codes. Needs d % 4 == 0.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void interleave_block(
    const int8_t* codes, int64_t stride, int64_t rows, int64_t d, uint8_t* out, int32_t* ksum16) {
  const int64_t G = d / 4, groups = (rows + 15) / 16;
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t rg = 0; rg < groups; ++rg) {
    const int64_t n = std::min<int64_t>(16, rows - rg * 16);
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
    const __m512i offsets =
        _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                           _mm512_set1_epi32(static_cast<int>(stride)));
    const int8_t* base = codes + rg * 16 * stride;
    __m512i sum = _mm512_setzero_si512();
    for (int64_t g = 0; g < G; ++g) {
      const __m512i v =
          _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, offsets, base + 4 * g, 1);
      _mm512_storeu_si512(out + (rg * G + g) * 64, v);
      sum = _mm512_dpbusd_epi32(sum, ones, v);
    }
    _mm512_storeu_si512(ksum16 + rg * 16, sum);
  }
}

// Scores the interleaved block for Q queries at once (qg[i]: query i's groups of 4 bytes, offset
// by 128): each 64-byte vector of the block is loaded once for all Q. Offers every row that can
// enter query i's heap h[i] and is not excluded for query q0 + i; rows r0 .. r0 + rows - 1.
template <int Q>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void score_block(
    const uint32_t* const* qg, const uint8_t* block, const int32_t* ksum16, const float* scales,
    int64_t r0, int64_t rows, int64_t d, TopKHeap<float>* const* h, const Exclusions& ex,
    int64_t q0) {
  const int64_t G = d / 4, groups = (rows + 15) / 16;
  for (int64_t rg = 0; rg < groups; rg += 4) {
    const int m = static_cast<int>(std::min<int64_t>(4, groups - rg));
    __m512i acc[Q][4];
    for (int i = 0; i < Q; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
    const uint8_t* b = block + rg * G * 64;
    for (int64_t g = 0; g < G; ++g) {
      __m512i kv[4];
      for (int j = 0; j < 4; ++j)  // groups past the block contribute nothing
        kv[j] = j < m ? _mm512_loadu_si512(b + (j * G + g) * 64) : _mm512_setzero_si512();
      for (int i = 0; i < Q; ++i) {
        const __m512i qv = _mm512_set1_epi32(static_cast<int>(qg[i][g]));
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], qv, kv[j]);
      }
    }
    for (int j = 0; j < m; ++j) {
      const int64_t first = (rg + j) * 16, n = std::min<int64_t>(16, rows - first);
      const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
      const __m512i sum128 = _mm512_slli_epi32(_mm512_loadu_si512(ksum16 + first), 7);
      const __m512 scale = _mm512_maskz_loadu_ps(valid, scales + first);
      for (int i = 0; i < Q; ++i) {
        // float32(dot) * scale, each rounded once, as reference.coarse_scores.
        const __m512 sc =
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], sum128)), scale);
        __mmask16 hit = _mm512_mask_cmp_ps_mask(valid, sc, _mm512_set1_ps(h[i]->worst_score()),
                                                _CMP_NLT_UQ);  // not below the worst; NaN too
        if (!hit) continue;
        alignas(64) float lanes[16];
        _mm512_store_ps(lanes, sc);
        while (hit) {
          const int lane = __builtin_ctz(hit);
          hit = static_cast<__mmask16>(hit & (hit - 1));
          const int64_t r = r0 + first + lane;
          if (lanes[lane] < h[i]->worst_score()) continue;  // the worst rose since the compare
          if (ex.rejects(q0 + i, r)) continue;
          h[i]->push(lanes[lane], r);
        }
      }
    }
  }
}

// VNNI where the CPU has it and the level in use is an AVX-512 one (RECO_CPU_LEVEL=generic or
// avx2 selects the integer loop).
bool has_vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni") && default_level() >= Level::avx512;
}
bool has_avx2() { return __builtin_cpu_supports("avx2") && default_level() >= Level::avx2; }
#else
bool has_vnni() { return false; }
bool has_avx2() { return false; }
#endif

}  // namespace

bool coarse_int8_uses_vnni() { return has_vnni(); }

void coarse_int8(const CoarseInt8Args& a) {
  const int64_t B = a.query_codes.shape[0], d = a.query_codes.shape[1];
  const int64_t N = a.codes.shape[0], c = a.candidates;
  if (a.query_codes.dtype != DType::i8 || a.codes.dtype != DType::i8 ||
      a.scales.dtype != DType::f32 || a.codes.shape[1] != d || a.scales.shape[0] != N ||
      a.query_codes.strides[1] != 1 || a.codes.strides[1] != 1 || a.scales.strides[0] != 1)
    throw std::invalid_argument(
        "coarse_int8: query_codes [B, d] and codes [N, d] int8 with unit inner stride, "
        "scales [N] float32 contiguous");
  if (c < 1 || c > N) throw std::invalid_argument("coarse_int8: candidates must be in [1, N]");
  check_exclude(a.exclude, B, N);
  check_allow(a.allow, N);
  // Subnormal scales and scores honoured whatever the caller's mode (fp_mode.h): here for the
  // merge on this thread, in the parallel region for every worker.
  const HonourSubnormals fp_mode;
  Exclusions ex = make_exclusions(a.exclude, B);
  // Disallowed rows are skipped where a score would enter a heap (the scan itself is not cut).
  ex.allow = a.allow.present() ? a.allow.ptr<const uint8_t>() : nullptr;
  // (Both false where there is no x86 code: the integer loop alone.)
  [[maybe_unused]] const bool vnni = has_vnni(), avx2 = !vnni && has_avx2();
  const int threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, N / 16384)));
  // Queries per pass: heaps (threads x queries x candidates) of about 64 MiB at most.
  const int64_t chunk = std::max<int64_t>(1, (64 << 20) / (int64_t(threads) * c * 12));
  const int8_t* codes = a.codes.ptr<const int8_t>();
  const float* scales = a.scales.ptr<const float>();
  std::vector<uint8_t> qu;  // queries + 128, for vpdpbusd
  std::vector<float> hs(size_t(threads) * std::min(chunk, B) * c);
  std::vector<int64_t> hr(hs.size());
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t nq = std::min(chunk, B - b0);
    // Enough queries to amortise laying each block out once for all of them (measured on
    // dev-cpu: 16 queries were faster row by row, 32 laid out; the times cross near 26).
    [[maybe_unused]] const bool interleaved = vnni && nq >= 24 && d % 4 == 0;
    const int8_t* q0 = a.query_codes.ptr<const int8_t>() + b0 * a.query_codes.strides[0];
    if (vnni) {
      qu.resize(size_t(nq) * d);
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t j = 0; j < d; ++j)
          qu[i * d + j] = uint8_t(int(q0[i * a.query_codes.strides[0] + j]) + 128);
    }
#pragma omp parallel num_threads(threads)
    {
      const HonourSubnormals worker_fp_mode;
      const int t = omp_get_thread_num();
      const int64_t per = (N + threads - 1) / threads;
      const int64_t n0 = std::min(N, t * per), n1 = std::min(N, n0 + per);
      std::vector<TopKHeap<float>> heaps(nq);
      for (int64_t i = 0; i < nq; ++i) {
        const size_t o = (size_t(t) * nq + i) * c;
        heaps[i] = TopKHeap<float>{hs.data() + o, hr.data() + o, int(c)};
        heaps[i].reset(std::numeric_limits<float>::quiet_NaN());
      }
      std::vector<int32_t> ksum(kBlockRows);
#if defined(RECO_VNNI)
      std::vector<uint8_t> block(interleaved ? size_t(kBlockRows) * d : 0);
#endif
      for (int64_t r0 = n0; r0 < n1; r0 += kBlockRows) {
        const int64_t r1 = std::min(n1, r0 + kBlockRows);
#if defined(RECO_VNNI)
        if (interleaved) {
          interleave_block(codes + r0 * a.codes.strides[0], a.codes.strides[0], r1 - r0, d,
                           block.data(), ksum.data());
          for (int64_t i = 0; i < nq;) {
            const int n = nq - i >= 4 ? 4 : 1;
            const uint32_t* qg[4];
            TopKHeap<float>* hp[4];
            for (int j = 0; j < n; ++j) {
              qg[j] = reinterpret_cast<const uint32_t*>(qu.data() + (i + j) * d);
              hp[j] = &heaps[i + j];
            }
            if (n == 4)
              score_block<4>(qg, block.data(), ksum.data(), scales + r0, r0, r1 - r0, d, hp, ex,
                             b0 + i);
            else
              score_block<1>(qg, block.data(), ksum.data(), scales + r0, r0, r1 - r0, d, hp, ex,
                             b0 + i);
            i += n;
          }
          continue;
        }
        if (vnni)
          for (int64_t r = r0; r < r1; ++r)
            ksum[r - r0] = row_sum_vnni(codes + r * a.codes.strides[0], d);
#endif
        for (int64_t i = 0; i < nq; ++i) {
          const int8_t* q = q0 + i * a.query_codes.strides[0];
          TopKHeap<float>& h = heaps[i];
          for (int64_t r = r0; r < r1; r += 4) {
            const int8_t* k[4];
            for (int j = 0; j < 4; ++j)  // past r1, repeat the last row (its dots are dropped)
              k[j] = codes + std::min(r + j, r1 - 1) * a.codes.strides[0];
            int32_t dots[4];
#if defined(RECO_VNNI)
            if (vnni) {
              int32_t s4[4];
              for (int j = 0; j < 4; ++j) s4[j] = ksum[std::min(r + j, r1 - 1) - r0];
              dots4_vnni(qu.data() + i * d, k, s4, d, dots);
            } else if (avx2) {
              dots4_avx2(q, k, d, dots);
            } else
#endif
              dots4_generic(q, k, d, dots);
            for (int j = 0; j < 4 && r + j < r1; ++j) {
              // float32(dot) * scale, each rounded once, as reference.coarse_scores.
              const float s = float(dots[j]) * scales[r + j];
              if (s < h.worst_score() || ex.rejects(b0 + i, r + j)) continue;
              h.push(s, r + j);
            }
          }
        }
      }
    }
    // Merge the threads' heaps per query: the first `candidates` in the contract's order.
    for (int64_t i = 0; i < nq; ++i) {
      std::vector<std::pair<float, int64_t>> all;
      all.reserve(size_t(threads) * c);
      for (int t = 0; t < threads; ++t) {
        const size_t o = (size_t(t) * nq + i) * c;
        for (int64_t j = 0; j < c; ++j)
          if (hr[o + j] != kEmptyRow) all.emplace_back(hs[o + j], hr[o + j]);
      }
      const auto before = [](const std::pair<float, int64_t>& x,
                             const std::pair<float, int64_t>& y) {
        return ranks_before(x.first, x.second, y.first, y.second);
      };
      const size_t keep = std::min<size_t>(all.size(), size_t(c));
      std::partial_sort(all.begin(), all.begin() + keep, all.end(), before);
      int64_t* rows = a.rows.ptr<int64_t>() + (b0 + i) * a.rows.strides[0];
      float* sc = a.scores.ptr<float>() + (b0 + i) * a.scores.strides[0];
      for (int64_t j = 0; j < c; ++j) {
        const bool in = size_t(j) < keep;
        rows[j] = in ? all[j].second : -1;
        sc[j] = in ? all[j].first : std::numeric_limits<float>::quiet_NaN();
      }
    }
  }
}

}  // namespace reco::cpu
