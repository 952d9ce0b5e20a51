// The CPU retrieve-attend kernel, written once over generic vectors of RECO_VW floats and
// compiled once per SIMD level (retrieve_attend_<level>.cpp sets the flags and the namespace).
//
// Search: threads split the N keys into contiguous ranges; each walks its range in blocks that
// stay in L2 (16-bit keys are widened to float there, exactly), scores register tiles of
// QR queries x KR keys, and offers each score to that query's bounded heap. No B x N score
// matrix exists. The per-thread heaps are merged, then values are gathered, softmaxed and summed.
// Every level computes with subnormals honoured (fp_mode.h); see dot_is_exact for vdpbf16ps.
#pragma once
#if !defined(RECO_LEVEL_NS) || !defined(RECO_VW)
#error "define RECO_LEVEL_NS and RECO_VW before including retrieve_attend_impl.h"
#endif

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(RECO_NEON)
#if !defined(__ARM_NEON) || RECO_VW != 4
#error "the neon level is built for AArch64 with RECO_VW 4"
#endif
#include <arm_neon.h>
#endif

#include "exclusions.h"
#include "fp_mode.h"
#include "reco/topk.h"
#include "retrieve_attend.h"

namespace reco::cpu::RECO_LEVEL_NS {
namespace {

constexpr int VW = RECO_VW;
typedef float vf __attribute__((vector_size(VW * 4), aligned(4), may_alias));
typedef uint16_t vu16 __attribute__((vector_size(VW * 2), aligned(2), may_alias));
typedef uint32_t vu32 __attribute__((vector_size(VW * 4), aligned(4), may_alias));

inline vf vload(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void vstore(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- reading keys as float (exact for every input dtype) ----------------------------------

inline vf load_keys(const float* p) { return vload(p); }

inline vf load_keys(const bf16_t* p) {
#if defined(RECO_NEON)
  const uint32x4_t w = vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16);
  return reinterpret_cast<const vf&>(w);
#else
  const vu32 w = __builtin_convertvector(*reinterpret_cast<const vu16*>(p), vu32) << 16;
  return reinterpret_cast<const vf&>(w);
#endif
}

inline vf load_keys(const half_t* p) {
#if defined(RECO_NEON)
  // fcvtl: exact, subnormal halves included (they widen to normal floats).
  const float32x4_t x =
      vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p))));
  return reinterpret_cast<const vf&>(x);
#elif RECO_VW == 16 && defined(__AVX512F__)
  const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return reinterpret_cast<const vf&>(x);
#elif RECO_VW == 8 && defined(__F16C__)
  const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return reinterpret_cast<const vf&>(x);
#else
  vf x;
  for (int l = 0; l < VW; ++l) x[l] = to_float(p[l]);
  return x;
#endif
}

template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + VW <= n; i += VW) vstore(dst + i, load_keys(src + i));
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

// Row r of a block: src's row r, or (a gathered block) its row ids[r].
template <typename T>
inline const T* block_row(const T* src, int64_t ld, const int64_t* ids, int64_t r) {
  return src + (ids != nullptr ? ids[r] : r) * ld;
}

// Widens `rows` rows of width d (row stride ld; rows ids[r] where ids is given) into dst rows of
// width dpad, zero padded.
template <typename T>
void widen_rows(const T* src, int64_t ld, const int64_t* ids, int64_t rows, int64_t d, float* dst,
                int64_t dpad) {
  for (int64_t r = 0; r < rows; ++r) {
    widen(block_row(src, ld, ids, r), dst + r * dpad, d);
    std::fill(dst + r * dpad + d, dst + (r + 1) * dpad, 0.0f);
  }
}

// ---- register-tiled scores ---------------------------------------------------------------

constexpr int lo_lane(int g, int i) { return (i / g) * 2 * g + (i % g); }

// Lanes [a's first half-group, b's first half-group, ...] plus the matching second halves:
// one level of a transposing reduction.
template <int G, int... I>
inline vf fold(vf a, vf b, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(a, b, lo_lane(G, I)...) +
         __builtin_shufflevector(a, b, (lo_lane(G, I) + G)...);
}

// Reduces VW accumulators to one vector whose lane j is the sum of acc[j].
template <int G>
inline void fold_level(vf* acc, int n) {
  for (int i = 0; i < n / 2; ++i)
    acc[i] = fold<G>(acc[2 * i], acc[2 * i + 1], std::make_integer_sequence<int, VW>{});
  if constexpr (G > 1) fold_level<G / 2>(acc, n / 2);
}

// Sums the lanes in the same halving order as fold_level, so a score comes out bitwise the same
// whether its key sat in a full tile or in a tail (duplicate keys then tie exactly).
template <int G>
inline float hsum_fold(vf v) {
  v = fold<G>(v, v, std::make_integer_sequence<int, VW>{});
  if constexpr (G > 1)
    return hsum_fold<G / 2>(v);
  else
    return v[0];
}
inline float hsum(vf v) { return hsum_fold<VW / 2>(v); }

// out[i] = the lane sum of acc[i]; each sum in the same order whatever NA.
template <int NA>
inline void reduce_tile(vf* acc, float* out) {
  if constexpr (NA % VW == 0) {
    for (int g = 0; g < NA; g += VW) {
      fold_level<VW / 2>(acc + g, VW);
      vstore(out + g, acc[g]);
    }
  } else {
    for (int i = 0; i < NA; ++i) out[i] = hsum(acc[i]);
  }
}

// out[qi * KR + r] = q[qi] . k[r] over dpad (a multiple of VW) columns.
template <int QR, int KR, typename KT>
inline void score_tile(const float* q, int64_t ldq, const KT* kp, int64_t ldk, int64_t dpad,
                       float* out) {
  constexpr int NA = QR * KR;
  vf acc[NA];
  for (int i = 0; i < NA; ++i) acc[i] = vf{};
  for (int64_t c = 0; c < dpad; c += VW) {
    vf kv[KR];
    for (int r = 0; r < KR; ++r) kv[r] = load_keys(kp + r * ldk + c);
    for (int qi = 0; qi < QR; ++qi) {
      const vf qv = vload(q + qi * ldq + c);
      for (int r = 0; r < KR; ++r) acc[qi * KR + r] += qv * kv[r];
    }
  }
  reduce_tile<NA>(acc, out);
}

#if defined(RECO_BF16_DOT)
// bfloat16 query x bfloat16 keys with vdpbf16ps: each lane adds the exact products of one adjacent
// pair, so a step covers 2 x VW columns (dpad is a multiple of 2 x VW), twice the float32 rate.
template <int QR, int KR>
inline void score_tile(const bf16_t* q, int64_t ldq, const bf16_t* kp, int64_t ldk, int64_t dpad,
                       float* out) {
  constexpr int NA = QR * KR;
  __m512 acc[NA];
  for (int i = 0; i < NA; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < dpad; c += 2 * VW) {
    __m512bh kv[KR];
    for (int r = 0; r < KR; ++r)
      kv[r] = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(kp + r * ldk + c));
    for (int qi = 0; qi < QR; ++qi) {
      const __m512bh qv =
          (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(q + qi * ldq + c));
      for (int r = 0; r < KR; ++r) acc[qi * KR + r] = _mm512_dpbf16_ps(acc[qi * KR + r], qv, kv[r]);
    }
  }
  vf v[NA];
  for (int i = 0; i < NA; ++i) v[i] = reinterpret_cast<const vf&>(acc[i]);
  reduce_tile<NA>(v, out);
}
constexpr bool kHasBf16Dot = true;
#else
constexpr bool kHasBf16Dot = false;
#endif

// ---- where vdpbf16ps is exact -------------------------------------------------------------
//
// vdpbf16ps reads subnormal inputs as zero and flushes subnormal results, whatever MXCSR says,
// while the contract (and every other level) honours subnormals. It is used only where no input,
// product or partial sum can be subnormal. A nonzero bfloat16 of biased exponent E >= 1 is a
// multiple of 2^(E - 134), so if Eq + Ek >= 142 for every element pair, each product is a multiple
// of 2^-126, and so is each partial sum (and its float32 rounding): nonzero ones are >= 2^-126 in
// magnitude, normal. Eq is the least exponent over a query's nonzero elements, Ek over a key row's.

#if defined(__AVX512BW__)
// Folds (|v| bits) - 1 of 32 bfloat16 lanes into acc by unsigned minimum (zeros wrap to 0xffff,
// out of the minimum's way).
inline __m512i fold_magnitudes(__m512i acc, __m512i v) {
  const __m512i magnitude = _mm512_set1_epi16(0x7fff), one = _mm512_set1_epi16(1);
  return _mm512_min_epu16(acc, _mm512_sub_epi16(_mm512_and_si512(v, magnitude), one));
}

// The first n < 32 elements of x, the other lanes zero (never read).
inline __m512i load_head(const bf16_t* x, int64_t n) {
  return _mm512_maskz_loadu_epi16((__mmask32(1) << n) - 1, reinterpret_cast<const void*>(x));
}

// fold_magnitudes over x[0, n).
inline __m512i fold_magnitudes(__m512i acc, const bf16_t* x, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    acc = fold_magnitudes(acc, _mm512_loadu_si512(reinterpret_cast<const void*>(x + i)));
  return i < n ? fold_magnitudes(acc, load_head(x + i, n - i)) : acc;
}

// The exponent (as min_exponent returns it) of the least lane of a fold_magnitudes accumulator.
inline int exponent_of_least(__m512i acc) {
  const __m256i h =
      _mm256_min_epu16(_mm512_castsi512_si256(acc), _mm512_extracti64x4_epi64(acc, 1));
  const __m128i q = _mm_min_epu16(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  const int m = _mm_extract_epi16(_mm_minpos_epu16(q), 0);
  return m == 0xffff ? 255 : (m + 1) >> 7;
}
#endif

// The least biased exponent among the nonzero elements of x[0, n): 0 if one is subnormal, 255 if
// all are zero.
inline int min_exponent(const bf16_t* x, int64_t n) {
#if defined(__AVX512BW__)
  return exponent_of_least(fold_magnitudes(_mm512_set1_epi16(-1), x, n));
#else
  uint16_t m = 0xffff;  // (|x| bits) - 1 wraps zeros to 0xffff, out of the minimum's way
  for (int64_t i = 0; i < n; ++i)
    m = std::min<uint16_t>(m, static_cast<uint16_t>((x[i].bits & 0x7fffu) - 1u));
  return m == 0xffff ? 255 : (m + 1) >> 7;
#endif
}

constexpr bool dot_is_exact(int eq, int ek) { return eq > 0 && ek > 0 && eq + ek >= 142; }

// A vdpbf16ps pass: per query slot its exponent (min_exponent), the least of them, and the
// queries as float rows (width dpf, zero padded) for the pairs that fall back to float32 tiles.
struct DotPass {
  const uint8_t* eq;
  int eq_min;
  const float* qf;
  int64_t dpf;
};

// One thread's view of a block of a vdpbf16ps pass: ek[r], each row's exponent; krow, one key row
// widened to float. in_place: rows are read in place, and the first tile of queries measures each
// row just before scoring it (one sequential stream, as the scoring's); else ek was filled before.
struct DotBlock {
  const DotPass* pass;
  uint8_t* ek;
  float* krow;
  int64_t d;
  bool in_place;
  // A row read in place whose fold_magnitudes has a lane below this is measured exactly; the
  // others pass for every query of the pass ((E << 7) - 1, E the least passing row exponent).
  uint16_t suspect_below;
};

// Re-scores with the float32 tile (the same sums as a float32 pass) the scores s[qi * KR + j] of
// queries slot0 + qi x rows r + j of the block kp (row stride ld) whose exponents ek[j] rule out
// vdpbf16ps.
template <int QR, int KR>
__attribute__((noinline)) void rescore_inexact(const DotBlock& db, int64_t slot0, const bf16_t* kp,
                                               int64_t ld, int64_t r, const uint8_t* ek, float* s) {
  const DotPass& p = *db.pass;
  for (int j = 0; j < KR; ++j) {
    if (dot_is_exact(p.eq_min, ek[j])) continue;
    bool widened = false;
    for (int qi = 0; qi < QR; ++qi) {
      if (dot_is_exact(p.eq[slot0 + qi], ek[j])) continue;
      if (!widened) {
        widen(kp + (r + j) * ld, db.krow, db.d);
        std::fill(db.krow + db.d, db.krow + p.dpf, 0.0f);
        widened = true;
      }
      score_tile<1, 1>(p.qf + (slot0 + qi) * p.dpf, p.dpf, db.krow, p.dpf, p.dpf, s + qi * KR + j);
    }
  }
}

// Copies rows of bfloat16 keys unchanged into rows of width dpad, zero padded; returns the least
// min_exponent of the rows (each measured while its copy is still in L1).
inline int copy_rows_measured(const bf16_t* src, int64_t ld, const int64_t* ids, int64_t rows,
                              int64_t d, bf16_t* dst, int64_t dpad) {
#if defined(__AVX512BW__)
  // dpad is a multiple of 32 (vdpbf16ps tiles step 32 columns): whole vectors only.
  __m512i acc = _mm512_set1_epi16(-1);
  for (int64_t r = 0; r < rows; ++r) {
    const bf16_t* s = block_row(src, ld, ids, r);
    bf16_t* t = dst + r * dpad;
    int64_t c = 0;
    for (; c + 32 <= d; c += 32) {
      const __m512i v = _mm512_loadu_si512(reinterpret_cast<const void*>(s + c));
      _mm512_storeu_si512(reinterpret_cast<void*>(t + c), v);
      acc = fold_magnitudes(acc, v);
    }
    if (c < d) {
      const __m512i v = load_head(s + c, d - c);
      _mm512_storeu_si512(reinterpret_cast<void*>(t + c), v);
      acc = fold_magnitudes(acc, v);
      c += 32;
    }
    for (; c < dpad; c += 32)
      _mm512_storeu_si512(reinterpret_cast<void*>(t + c), _mm512_setzero_si512());
  }
  return exponent_of_least(acc);
#else
  int least = 255;
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * dpad, block_row(src, ld, ids, r), d * sizeof(bf16_t));
    std::memset(static_cast<void*>(dst + r * dpad + d), 0, (dpad - d) * sizeof(bf16_t));
    least = std::min(least, min_exponent(dst + r * dpad, d));
  }
  return least;
#endif
}

// ---- search -------------------------------------------------------------------------------

// Heaps for a chunk of queries, one set per thread: slot (t, b) holds k entries.
template <typename S>
struct HeapSet {
  int64_t k, nq;
  std::vector<S> score;
  std::vector<int64_t> row;
  HeapSet(int threads, int64_t nq_, int64_t k_)
      : k(k_), nq(nq_), score(threads * nq_ * k_), row(threads * nq_ * k_) {}
  TopKHeap<S> heap(int t, int64_t b) {
    const int64_t off = (t * nq + b) * k;
    return TopKHeap<S>{score.data() + off, row.data() + off, static_cast<int>(k)};
  }
};

template <typename S>
inline void offer(TopKHeap<S>& h, const Exclusions& ex, int64_t b, S s, int64_t row) {
  if (s < h.worst_score()) return;  // the common case; false for NaN, which push() ranks
  if (ex.rejects(b, row)) return;
  h.push(s, row);
}

#if defined(RECO_BF16_DOT)
// score_tile<QR, 1> (bitwise the same scores) that also folds the key row's magnitudes
// (fold_magnitudes) as it loads them, for rows read in place: returns the fold.
template <int QR>
inline __m512i score_tile_folding(const bf16_t* q, int64_t ldq, const bf16_t* kp, int64_t dpad,
                                  float* out) {
  __m512 acc[QR];
  for (int i = 0; i < QR; ++i) acc[i] = _mm512_setzero_ps();
  __m512i fold = _mm512_set1_epi16(-1);
  for (int64_t c = 0; c < dpad; c += 2 * VW) {
    const __m512i kw = _mm512_loadu_si512(reinterpret_cast<const void*>(kp + c));
    fold = fold_magnitudes(fold, kw);
    for (int qi = 0; qi < QR; ++qi) {
      const __m512bh qv =
          (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(q + qi * ldq + c));
      acc[qi] = _mm512_dpbf16_ps(acc[qi], qv, (__m512bh)kw);
    }
  }
  vf v[QR];
  for (int i = 0; i < QR; ++i) v[i] = reinterpret_cast<const vf&>(acc[i]);
  reduce_tile<QR>(v, out);
  return fold;
}

// The exponent to record for a row read in place, from its fold: 255 (passes for every query of
// the pass) unless a lane is below db.suspect_below, else the row's exact min_exponent.
inline uint8_t row_exponent(const DotBlock& db, __m512i fold) {
  const __mmask32 low = _mm512_cmplt_epu16_mask(fold, _mm512_set1_epi16(db.suspect_below));
  return low ? static_cast<uint8_t>(exponent_of_least(fold)) : 255;
}
#endif

// How many rows ahead a gathered block read in place prefetches.
constexpr int64_t kPrefetchRows = 4;

// Fix: a vdpbf16ps pass's block where some (query, row) pair may not be dot_is_exact (db says
// which), re-scored in float32; false everywhere else, the plain tile loop.
template <int QR, int KR, bool Fix, typename QT, typename KT>
void score_block_rows(const QT* q, int64_t dpad, const KT* kp, int64_t ldk, int64_t rows,
                      int64_t row0, const int64_t* ids, int64_t slot0, const int64_t* gid,
                      HeapSet<float>& hs, int t, const Exclusions& ex,
                      [[maybe_unused]] const DotBlock* db) {
  // slot0: the tile's first query's heap slot; gid[qi]: its row in the batch. Block row r is key
  // row row0 + r, or ids[r] in a gathered block. Blocks of KR = 1 are read in place: a gathered
  // one is addressed through ids too (kp is then the keys' first row); blocks of KR > 1 (4, or
  // kCopiedTileKeys) are copies.
  const auto key_row = [&](int64_t r) { return ids != nullptr ? ids[r] : row0 + r; };
  const bool addressed = KR == 1 && ids != nullptr;
  TopKHeap<float> heaps[QR];
  for (int qi = 0; qi < QR; ++qi) heaps[qi] = hs.heap(t, slot0 + qi);
  float s[QR * KR];
  int64_t r = 0;
  for (; r + KR <= rows; r += KR) {
    const KT* kr = kp + (addressed ? ids[r] : r) * ldk;  // the tile's first key row
    if (addressed && slot0 == 0 && r + kPrefetchRows < rows) {
      // Gathered rows do not follow one another: fetch a later one ahead of its use, into the
      // outer caches (locality 1 measured faster than into L1 on dev-cpu, with less pollution).
      const char* next = reinterpret_cast<const char*>(kp + ids[r + kPrefetchRows] * ldk);
      for (int64_t c = 0; c < dpad * int64_t(sizeof(KT)); c += 64)
        __builtin_prefetch(next + c, 0, 1);
    }
#if defined(RECO_BF16_DOT)
    if constexpr (Fix && KR == 1) {
      if (db->in_place && slot0 == 0)  // the first tile of queries measures the rows it streams
        db->ek[r] = row_exponent(*db, score_tile_folding<QR>(q, dpad, kr, dpad, s));
      else
        score_tile<QR, KR>(q, dpad, kr, ldk, dpad, s);
    } else {
      score_tile<QR, KR>(q, dpad, kr, ldk, dpad, s);
    }
    if constexpr (Fix) {
      bool inexact = false;
      for (int j = 0; j < KR; ++j) inexact |= !dot_is_exact(db->pass->eq_min, db->ek[r + j]);
      if (inexact) rescore_inexact<QR, KR>(*db, slot0, kr, ldk, 0, db->ek + r, s);
    }
#else
    score_tile<QR, KR>(q, dpad, kr, ldk, dpad, s);
#endif
    for (int qi = 0; qi < QR; ++qi)
      for (int j = 0; j < KR; ++j)
        if (!(s[qi * KR + j] < heaps[qi].worst_score()))  // the row is looked up only past this
          offer(heaps[qi], ex, gid[qi], s[qi * KR + j], key_row(r + j));
  }
  for (; r < rows; ++r) {  // only copied blocks (KR > 1) have tails: ek is filled
    score_tile<QR, 1>(q, dpad, kp + r * ldk, ldk, dpad, s);
#if defined(RECO_BF16_DOT)
    if constexpr (Fix)
      if (!dot_is_exact(db->pass->eq_min, db->ek[r]))
        rescore_inexact<QR, 1>(*db, slot0, kp, ldk, r, db->ek + r, s);
#endif
    for (int qi = 0; qi < QR; ++qi) offer(heaps[qi], ex, gid[qi], s[qi], key_row(r));
  }
}

// Scores the nq queries of a pass (padded rows of width dpad; gid[i] is query i's batch row)
// against one block of key rows, in tiles of up to 4 queries x KR keys. Every score is
// accumulated in the same order whatever the tile shape, so a result does not depend on the
// batch it came in.
template <int KR, bool Fix = false, typename QT, typename KT>
void score_block(const QT* qpad, int64_t dpad, const int64_t* gid, int64_t nq, const KT* kp,
                 int64_t ld, int64_t rows, int64_t r0, const int64_t* ids, HeapSet<float>& hs,
                 int t, const Exclusions& ex, const DotBlock* db = nullptr) {
  int64_t i = 0;
  for (; i + 4 <= nq; i += 4)
    score_block_rows<4, KR, Fix>(qpad + i * dpad, dpad, kp, ld, rows, r0, ids, i, gid + i, hs, t,
                                 ex, db);
  switch (nq - i) {
    case 3:
      score_block_rows<3, KR, Fix>(qpad + i * dpad, dpad, kp, ld, rows, r0, ids, i, gid + i, hs, t,
                                   ex, db);
      break;
    case 2:
      score_block_rows<2, KR, Fix>(qpad + i * dpad, dpad, kp, ld, rows, r0, ids, i, gid + i, hs, t,
                                   ex, db);
      break;
    case 1:
      score_block_rows<1, KR, Fix>(qpad + i * dpad, dpad, kp, ld, rows, r0, ids, i, gid + i, hs, t,
                                   ex, db);
      break;
    default: break;
  }
}

// Up to this many queries, keys are streamed in place row after row (memory-bound regime).
constexpr int64_t kStreamMaxQueries = 8;

// Key rows per float32 tile of a copied block, by the level's vector registers: 4 x KR
// accumulators, KR key vectors and a query vector must fit. 4 x 4 needs 21, which AVX-512's 32
// zmm (and AArch64's 32 q registers) hold but x86's 16 ymm/xmm do not: the avx2 build spilled two
// accumulators in its inner loop and loaded every key 4 times, so 16 registers tile 4 x 3. Each
// score still accumulates alone in the same order, so results do not change with the tile.
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int kCopiedTileKeys = 4;
#else
constexpr int kCopiedTileKeys = 3;
#endif

// Key block rows: about 192 KiB as float, which stays in L2 while every query tile passes over it.
inline int64_t block_rows(int64_t dpad) {
  return std::max<int64_t>(4, std::min<int64_t>(1024, (192 << 10) / (dpad * 4)) / 4 * 4);
}

// Scores the nq queries of a pass against key rows [n0, n1) (or, given a gathered list ids of
// allowed rows, rows ids[n0 .. n1)), offering into thread t's heaps. float32 tiles (keys widened
// exactly); search_range_dot scores vdpbf16ps passes.
template <typename KT>
void search_range(const RetrieveAttendArgs& a, const float* qpad, int64_t dpad, const int64_t* gid,
                  int64_t nq, int64_t n0, int64_t n1, const int64_t* ids, HeapSet<float>& hs,
                  int t, const Exclusions& ex) {
  const int64_t d = a.keys.shape[1];
  const int64_t ldk = a.keys.strides[0];
  const KT* keys = a.keys.ptr<const KT>();
  // Few queries (memory-bound): key rows are read in place, one after another, a single
  // sequential stream that runs at memory bandwidth (16-bit keys widened in registers); each
  // tile holds one key row. Many queries (compute-bound): 4 x kCopiedTileKeys tiles reuse each
  // load, but read several rows at once, which the hardware prefetcher serves badly, so each
  // block is first copied (widened) sequentially into an L2-resident scratch. Gathered rows (ids)
  // are read in place through ids, or copied from there.
  const bool direct = d == dpad && nq <= kStreamMaxQueries;
  const int64_t block = block_rows(dpad);
  std::vector<float> scratch(direct ? 0 : block * dpad);
  for (int64_t r0 = n0; r0 < n1; r0 += block) {
    const int64_t rows = std::min(block, n1 - r0);
    const int64_t* bid = ids != nullptr ? ids + r0 : nullptr;
    if (direct) {
      score_block<1>(qpad, dpad, gid, nq, bid != nullptr ? keys : keys + r0 * ldk, ldk, rows, r0,
                     bid, hs, t, ex);
    } else {
      widen_rows(bid != nullptr ? keys : keys + r0 * ldk, ldk, bid, rows, d, scratch.data(), dpad);
      score_block<kCopiedTileKeys>(qpad, dpad, gid, nq, scratch.data(), dpad, rows, r0, bid, hs, t,
                                   ex);
    }
  }
}

// search_range for a vdpbf16ps pass (bfloat16 queries, KT = bf16_t keys), in the same two
// regimes; blocks are copied unwidened. Rows whose exponents are not dot_is_exact with their
// queries' are re-scored in float32: copied blocks are measured as they are copied (and skip the
// per-row checks when all their rows pass); rows read in place are measured one by one.
template <typename KT>
void search_range_dot(const RetrieveAttendArgs& a, const bf16_t* qpad, int64_t dpad,
                      const int64_t* gid, int64_t nq, int64_t n0, int64_t n1, const int64_t* ids,
                      HeapSet<float>& hs, int t, const Exclusions& ex, const DotPass& dot) {
  const int64_t d = a.keys.shape[1];
  const int64_t ldk = a.keys.strides[0];
  const KT* keys = a.keys.ptr<const KT>();
  const bool direct = d == dpad && nq <= kStreamMaxQueries;
  const int64_t block = block_rows(dpad);
  std::vector<bf16_t> scratch(direct ? 0 : block * dpad);
  std::vector<uint8_t> ek(block);
  std::vector<float> krow(dot.dpf);
  const int least_passing = std::max(1, 142 - dot.eq_min);  // see dot_is_exact
  const auto suspect_below = static_cast<uint16_t>((least_passing << 7) - 1);
  const DotBlock db{&dot, ek.data(), krow.data(), d, direct, suspect_below};
  for (int64_t r0 = n0; r0 < n1; r0 += block) {
    const int64_t rows = std::min(block, n1 - r0);
    const int64_t* bid = ids != nullptr ? ids + r0 : nullptr;
    if (direct) {
      score_block<1, true>(qpad, dpad, gid, nq, bid != nullptr ? keys : keys + r0 * ldk, ldk, rows,
                           r0, bid, hs, t, ex, &db);
      continue;
    }
    const int least = copy_rows_measured(bid != nullptr ? keys : keys + r0 * ldk, ldk, bid, rows, d,
                                         scratch.data(), dpad);
    if (dot_is_exact(dot.eq_min, least)) {
      score_block<4>(qpad, dpad, gid, nq, scratch.data(), dpad, rows, r0, bid, hs, t, ex);
    } else {  // rare: measure row by row
      for (int64_t r = 0; r < rows; ++r) ek[r] = min_exponent(scratch.data() + r * dpad, d);
      score_block<4, true>(qpad, dpad, gid, nq, scratch.data(), dpad, rows, r0, bid, hs, t, ex,
                           &db);
    }
  }
}

// float64 search (gradcheck and exactness checks): plain loops, parallel over key ranges.
template <typename KT>
void search_range_f64(const RetrieveAttendArgs& a, const int64_t* gid, int64_t nq, int64_t n0,
                      int64_t n1, const int64_t* ids, HeapSet<double>& hs, int t,
                      const Exclusions& ex) {
  const int64_t d = a.keys.shape[1];
  const int64_t ldk = a.keys.strides[0];
  const int64_t ldq = a.query.strides[0];
  const KT* keys = a.keys.ptr<const KT>();
  const double* q = a.query.ptr<const double>();
  for (int64_t i = 0; i < nq; ++i) {
    TopKHeap<double> h = hs.heap(t, i);
    const double* qb = q + gid[i] * ldq;
    for (int64_t p = n0; p < n1; ++p) {
      const int64_t n = ids != nullptr ? ids[p] : p;
      const KT* kr = keys + n * ldk;
      double s = 0.0;
      for (int64_t c = 0; c < d; ++c) s += qb[c] * to_acc<double>(kr[c]);
      offer(h, ex, gid[i], s, n);
    }
  }
}

// Merges the per-thread heaps of a pass's nq queries (batch rows gid[i]) into sorted indices and
// scores.
// Float searches then re-score the k winners with float64 accumulation (B x k x d, cheap next to
// the search) and re-sort them, so the reported scores, and the softmax over them, carry no
// float32 summation error. Returns the first query that has fewer than k selectable rows, or -1.
template <typename S, typename KT>
int64_t merge_heaps(const RetrieveAttendArgs& a, HeapSet<S>& hs, int threads, const int64_t* gid,
                    int64_t nq) {
  const int64_t k = a.k, d = a.keys.shape[1];
  const auto order = [](const auto& x, const auto& y) {
    return ranks_before(x.first, x.second, y.first, y.second);
  };
  int64_t short_query = -1;
#pragma omp parallel num_threads(threads)
  {
    const HonourSubnormals fp_mode;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t b = gid[i];
      std::vector<std::pair<S, int64_t>> cand;
      cand.reserve(threads * k);
      for (int t = 0; t < threads; ++t) {
        TopKHeap<S> h = hs.heap(t, i);
        for (int64_t j = 0; j < k; ++j)
          if (h.row[j] != kEmptyRow) cand.emplace_back(h.score[j], h.row[j]);
      }
      const int64_t take = std::min<int64_t>(k, cand.size());
      std::partial_sort(cand.begin(), cand.begin() + take, cand.end(), order);
      if constexpr (std::is_same<S, float>::value) {
        const float* q = a.query.ptr<const float>() + b * a.query.strides[0];
        for (int64_t j = 0; j < take; ++j) {
          const KT* kr = a.keys.ptr<const KT>() + cand[j].second * a.keys.strides[0];
          double s = 0.0;
          for (int64_t c = 0; c < d; ++c) s += double(q[c]) * to_acc<double>(kr[c]);
          cand[j].first = static_cast<float>(s);
        }
        std::sort(cand.begin(), cand.begin() + take, order);
      }
      int64_t* idx = a.indices.ptr<int64_t>() + b * k;
      S* sc = a.scores.ptr<S>() + b * k;
      for (int64_t j = 0; j < take; ++j) {
        sc[j] = cand[j].first;
        idx[j] = cand[j].second;
      }
      if (take < k) {
#pragma omp critical(reco_short_query)
        if (short_query < 0 || b < short_query) short_query = b;
      }
    }
  }
  return short_query;
}

inline bool exact_in_bf16(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    if (u & 0xffffu) return false;
  }
  return true;
}

// min_exponent of a row of floats that are exact in bfloat16 (their upper 16 bits).
inline int min_exponent_f32(const float* x, int64_t n) {
  uint16_t m = 0xffff;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    m = std::min<uint16_t>(m, static_cast<uint16_t>(((u >> 16) & 0x7fffu) - 1u));
  }
  return m == 0xffff ? 255 : (m + 1) >> 7;
}

// One pass over the keys for the queries gid[0..nq); QT picks the tile kind (see search_range).
// vdpbf16ps passes (QT = bf16_t) take each query's min_exponent in eq[0..nq).
template <typename Acc, typename QT, typename KT>
void search_pass(const RetrieveAttendArgs& a, const Exclusions& ex, const Allowed& al,
                 const int64_t* gid, int64_t nq, int threads, const uint8_t* eq = nullptr) {
  const int64_t N = a.keys.shape[0], d = a.query.shape[1], k = a.k;
  // The rows visited: all N (the mask, if any, tested in offer), or the gathered allowed ones.
  const int64_t* ids = al.gathered ? al.rows.data() : nullptr;
  const int64_t M = al.gathered ? static_cast<int64_t>(al.rows.size()) : N;
  HeapSet<Acc> hs(threads, nq, k);
  // float tiles step VW columns; vdpbf16ps tiles step 2 x VW.
  const int64_t dpad = round_up(d, std::is_same<QT, float>::value ? VW : 2 * VW);
  std::vector<QT> qpad;
  std::vector<float> qf;  // vdpbf16ps passes: the queries as float rows, for float32 re-scoring
  DotPass dot{eq, 255, nullptr, round_up(d, VW)};
  if constexpr (std::is_same<Acc, float>::value) {
    qpad.assign(nq * dpad, QT{});
    if constexpr (std::is_same<QT, bf16_t>::value) qf.assign(nq * dot.dpf, 0.0f);
    const float* q = a.query.ptr<const float>();
    for (int64_t i = 0; i < nq; ++i) {
      const float* src = q + gid[i] * a.query.strides[0];
      if constexpr (std::is_same<QT, float>::value) {
        std::memcpy(qpad.data() + i * dpad, src, d * 4);
      } else {
        for (int64_t c = 0; c < d; ++c) {  // exact: the pass only takes bf16-exact queries
          uint32_t u;
          std::memcpy(&u, src + c, 4);
          qpad[i * dpad + c].bits = static_cast<uint16_t>(u >> 16);
        }
        std::memcpy(qf.data() + i * dot.dpf, src, d * 4);
        dot.eq_min = std::min<int>(dot.eq_min, eq[i]);
      }
    }
    dot.qf = qf.data();
  }
#pragma omp parallel num_threads(threads)
  {
    const HonourSubnormals fp_mode;
    const int t = omp_get_thread_num();
    // Ranges start on multiples of 4 rows so that tiles stay whole.
    const int64_t per = round_up((M + threads - 1) / threads, 4);
    const int64_t n0 = std::min(M, t * per), n1 = std::min(M, n0 + per);
    for (int64_t i = 0; i < nq; ++i) hs.heap(t, i).reset(std::numeric_limits<Acc>::quiet_NaN());
    if constexpr (!std::is_same<Acc, float>::value)
      search_range_f64<KT>(a, gid, nq, n0, n1, ids, hs, t, ex);
    else if constexpr (std::is_same<QT, float>::value)
      search_range<KT>(a, qpad.data(), dpad, gid, nq, n0, n1, ids, hs, t, ex);
    else
      search_range_dot<KT>(a, qpad.data(), dpad, gid, nq, n0, n1, ids, hs, t, ex, dot);
  }
  const int64_t short_query = merge_heaps<Acc, KT>(a, hs, threads, gid, nq);
  if (short_query >= 0)
    throw std::invalid_argument(short_query_message(k, short_query, ex, al, N));
}

template <typename Acc, typename KT>
void search(const RetrieveAttendArgs& a, const Exclusions& ex, const Allowed& al) {
  const int64_t B = a.query.shape[0], d = a.query.shape[1], k = a.k;
  const int64_t M = al.gathered ? static_cast<int64_t>(al.rows.size()) : a.keys.shape[0];
  // Below ~16K rows per thread the fork/merge costs more than it saves.
  const int threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, M / 16384)));
  // Bound heap memory (threads x queries x k entries) to about 64 MiB per pass over the keys.
  const int64_t per_query = static_cast<int64_t>(threads) * k * (sizeof(Acc) + 8);
  const int64_t chunk = std::max<int64_t>(1, (64 << 20) / per_query);
  // Queries split by tile kind. With bfloat16 keys on a CPU with AVX512-BF16, a query whose
  // values are all exact in bfloat16, none subnormal, is scored with vdpbf16ps (exact products,
  // float32 sums) against the key rows where that is exact (dot_is_exact), with float32 tiles
  // against the others; the choice depends on the query and the row alone, so results stay
  // independent of the batch.
  std::vector<int64_t> dot_ids, float_ids;
  std::vector<uint8_t> dot_eq;
  for (int64_t b = 0; b < B; ++b) {
    bool dot = false;
    if constexpr (kHasBf16Dot && std::is_same<Acc, float>::value &&
                  std::is_same<KT, bf16_t>::value) {
      const float* q = a.query.ptr<const float>() + b * a.query.strides[0];
      if (exact_in_bf16(q, d)) {
        const int eq = min_exponent_f32(q, d);
        dot = eq > 0;
        if (dot) dot_eq.push_back(static_cast<uint8_t>(eq));
      }
    }
    (dot ? dot_ids : float_ids).push_back(b);
  }
  for (int64_t i = 0; i < static_cast<int64_t>(float_ids.size()); i += chunk)
    search_pass<Acc, float, KT>(a, ex, al, float_ids.data() + i,
                                std::min<int64_t>(chunk, float_ids.size() - i), threads);
  if constexpr (kHasBf16Dot && std::is_same<Acc, float>::value && std::is_same<KT, bf16_t>::value)
    for (int64_t i = 0; i < static_cast<int64_t>(dot_ids.size()); i += chunk)
      search_pass<Acc, bf16_t, KT>(a, ex, al, dot_ids.data() + i,
                                   std::min<int64_t>(chunk, dot_ids.size() - i), threads,
                                   dot_eq.data() + i);
}

// ---- attention over the retrieved rows ------------------------------------------------------

// Works in float64 whatever the inputs (B x H x k x dv is small next to the search), so that a
// sharp softmax (small temperature) does not amplify float32 rounding of the logits.
template <typename Acc, typename VT>
void attend(const RetrieveAttendArgs& a) {
  const int64_t B = a.query.shape[0], k = a.k, dv = a.values.shape[1];
  const int64_t H = a.attn_query.present() ? a.attn_query.shape[1] : 1;
  const int64_t ldv = a.values.strides[0];
  const VT* values = a.values.ptr<const VT>();
  const double inv_t = 1.0 / a.temperature;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, B)));
#pragma omp parallel num_threads(threads)
  {
    const HonourSubnormals fp_mode;
    std::vector<double> v(k * dv), logit(k), acc(dv);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t* idx = a.indices.ptr<const int64_t>() + b * k;
      const Acc* sc = a.scores.ptr<const Acc>() + b * k;
      for (int64_t j = 0; j < k; ++j) {
        const VT* src = values + idx[j] * ldv;
        double* dst = v.data() + j * dv;
        for (int64_t c = 0; c < dv; ++c) dst[c] = to_acc<double>(src[c]);
      }
      for (int64_t h = 0; h < H; ++h) {
        if (a.attn_query.present()) {
          const Acc* aq = a.attn_query.ptr<const Acc>() + (b * H + h) * dv;
          for (int64_t j = 0; j < k; ++j) {
            const double* vj = v.data() + j * dv;
            double s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t c = 0; c < dv; ++c) s += aq[c] * vj[c];
            logit[j] = s * inv_t;
          }
        } else {
          for (int64_t j = 0; j < k; ++j) logit[j] = sc[j] * inv_t;
        }
        // Softmax: NaN anywhere, or every logit -inf, gives NaN weights (as torch.softmax does).
        double m = -std::numeric_limits<double>::infinity();
        bool nan = false;
        for (int64_t j = 0; j < k; ++j) {
          nan |= std::isnan(logit[j]);
          m = std::max(m, logit[j]);
        }
        if (nan) m = std::numeric_limits<double>::quiet_NaN();
        double total = 0;
        for (int64_t j = 0; j < k; ++j) {
          logit[j] = std::exp(logit[j] - m);
          total += logit[j];
        }
        Acc* w = a.weights.ptr<Acc>() + (b * H + h) * k;
        Acc* out = a.output.ptr<Acc>() + (b * H + h) * dv;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t j = 0; j < k; ++j) {
          const double wj = logit[j] / total;
          w[j] = static_cast<Acc>(wj);
          const double* vj = v.data() + j * dv;
#pragma omp simd
          for (int64_t c = 0; c < dv; ++c) acc[c] += wj * vj[c];
        }
        for (int64_t c = 0; c < dv; ++c) out[c] = static_cast<Acc>(acc[c]);
      }
    }
  }
}

template <typename F>
void with_dtype(DType t, F&& f) {
  switch (t) {
    case DType::f32: f(float{}); break;
    case DType::f16: f(half_t{}); break;
    case DType::bf16: f(bf16_t{}); break;
    case DType::f64: f(double{}); break;
    default: throw std::invalid_argument("unsupported dtype");
  }
}

template <typename Acc>
void run(const RetrieveAttendArgs& a) {
  Exclusions ex = make_exclusions(a.exclude, a.query.shape[0]);
  const Allowed al =
      make_allowed(a.allow, a.keys.shape[0], a.query.shape[0] <= kStreamMaxQueries);
  if (al.count < a.k) {  // every query is short: say so before any search
    throw std::invalid_argument(short_query_message(a.k, 0, ex, al, a.keys.shape[0]));
  }
  ex.allow = al.gathered ? nullptr : al.mask;
  with_dtype(a.keys.dtype, [&](auto kt) {
    using KT = decltype(kt);
    if constexpr (std::is_same<Acc, float>::value && std::is_same<KT, double>::value)
      throw std::invalid_argument("float64 keys need a float64 query");
    else
      search<Acc, KT>(a, ex, al);
  });
  if (!a.values.present()) return;  // the search alone
  with_dtype(a.values.dtype, [&](auto vt) {
    using VT = decltype(vt);
    if constexpr (std::is_same<Acc, float>::value && std::is_same<VT, double>::value)
      throw std::invalid_argument("float64 values need a float64 query");
    else
      attend<Acc, VT>(a);
  });
}

}  // namespace

void retrieve_attend(const RetrieveAttendArgs& a) {
  const HonourSubnormals fp_mode;  // the calling thread's serial work (the workers' own: above)
  if (a.query.dtype == DType::f64)
    run<double>(a);
  else
    run<float>(a);
}

}  // namespace reco::cpu::RECO_LEVEL_NS
