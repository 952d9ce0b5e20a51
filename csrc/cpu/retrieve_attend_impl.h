// The CPU retrieve-attend kernel, written once over generic vectors of RECO_VW floats and
// compiled once per SIMD level (retrieve_attend_<level>.cpp sets the flags and the namespace).
//
// Search: threads split the N keys into contiguous ranges; each walks its range in blocks that
// stay in L2 (16-bit keys are widened to float there, exactly), scores register tiles of
// QR queries x KR keys, and offers each score to that query's bounded heap. No B x N score
// matrix exists. The per-thread heaps are merged, then values are gathered, softmaxed and summed.
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

#include "exclusions.h"
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
  const vu32 w = __builtin_convertvector(*reinterpret_cast<const vu16*>(p), vu32) << 16;
  return reinterpret_cast<const vf&>(w);
}

inline vf load_keys(const half_t* p) {
#if RECO_VW == 16 && defined(__AVX512F__)
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

// Widens `rows` rows of width d (row stride ld) into dst rows of width dpad, zero padded.
template <typename T>
void widen_rows(const T* src, int64_t ld, int64_t rows, int64_t d, float* dst, int64_t dpad) {
  for (int64_t r = 0; r < rows; ++r) {
    widen(src + r * ld, dst + r * dpad, d);
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

// Copies rows of 16-bit keys unchanged into rows of width dpad, zero padded.
template <typename T>
void copy_rows(const T* src, int64_t ld, int64_t rows, int64_t d, T* dst, int64_t dpad) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * dpad, src + r * ld, d * sizeof(T));
    std::memset(static_cast<void*>(dst + r * dpad + d), 0, (dpad - d) * sizeof(T));
  }
}

// ---- exclusions ---------------------------------------------------------------------------

// Per query, the sorted distinct rows it must not select.
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
  if (ex.contains(b, row)) return;
  h.push(s, row);
}

template <int QR, int KR, typename QT, typename KT>
void score_block_rows(const QT* q, int64_t dpad, const KT* kp, int64_t ldk, int64_t rows,
                      int64_t row0, int64_t slot0, const int64_t* gid, HeapSet<float>& hs, int t,
                      const Exclusions& ex) {
  // slot0: the tile's first query's heap slot; gid[qi]: its row in the batch.
  TopKHeap<float> heaps[QR];
  for (int qi = 0; qi < QR; ++qi) heaps[qi] = hs.heap(t, slot0 + qi);
  float s[QR * KR];
  int64_t r = 0;
  for (; r + KR <= rows; r += KR) {
    score_tile<QR, KR>(q, dpad, kp + r * ldk, ldk, dpad, s);
    for (int qi = 0; qi < QR; ++qi)
      for (int j = 0; j < KR; ++j) offer(heaps[qi], ex, gid[qi], s[qi * KR + j], row0 + r + j);
  }
  for (; r < rows; ++r) {
    score_tile<QR, 1>(q, dpad, kp + r * ldk, ldk, dpad, s);
    for (int qi = 0; qi < QR; ++qi) offer(heaps[qi], ex, gid[qi], s[qi], row0 + r);
  }
}

// Scores the nq queries of a pass (padded rows of width dpad; gid[i] is query i's batch row)
// against one block of key rows, in tiles of up to 4 queries x KR keys. Every score is
// accumulated in the same order whatever the tile shape, so a result does not depend on the
// batch it came in.
template <int KR, typename QT, typename KT>
void score_block(const QT* qpad, int64_t dpad, const int64_t* gid, int64_t nq, const KT* kp,
                 int64_t ld, int64_t rows, int64_t r0, HeapSet<float>& hs, int t,
                 const Exclusions& ex) {
  int64_t i = 0;
  for (; i + 4 <= nq; i += 4)
    score_block_rows<4, KR>(qpad + i * dpad, dpad, kp, ld, rows, r0, i, gid + i, hs, t, ex);
  switch (nq - i) {
    case 3:
      score_block_rows<3, KR>(qpad + i * dpad, dpad, kp, ld, rows, r0, i, gid + i, hs, t, ex);
      break;
    case 2:
      score_block_rows<2, KR>(qpad + i * dpad, dpad, kp, ld, rows, r0, i, gid + i, hs, t, ex);
      break;
    case 1:
      score_block_rows<1, KR>(qpad + i * dpad, dpad, kp, ld, rows, r0, i, gid + i, hs, t, ex);
      break;
    default: break;
  }
}

// Up to this many queries, keys are streamed in place row after row (memory-bound regime).
constexpr int64_t kStreamMaxQueries = 8;

// Scores the nq queries of a pass against key rows [n0, n1), offering into thread t's heaps.
// QT = float: float32 tiles (keys widened exactly); QT = bf16_t: vdpbf16ps tiles.
template <typename QT, typename KT>
void search_range(const RetrieveAttendArgs& a, const QT* qpad, int64_t dpad, const int64_t* gid,
                  int64_t nq, int64_t n0, int64_t n1, HeapSet<float>& hs, int t,
                  const Exclusions& ex) {
  const int64_t d = a.keys.shape[1];
  const int64_t ldk = a.keys.strides[0];
  const KT* keys = a.keys.ptr<const KT>();
  // Few queries (memory-bound): key rows are read in place, one after another, a single
  // sequential stream that runs at memory bandwidth (16-bit keys widened in registers); each
  // tile holds one key row. Many queries (compute-bound): 4 x 4 tiles reuse each load 4 times,
  // but read 4 rows at once, which the hardware prefetcher serves badly, so each block is first
  // copied (widened) sequentially into an L2-resident scratch.
  const bool direct = d == dpad && nq <= kStreamMaxQueries;
  // A key block of about 192 KiB as float stays in L2 while every query tile passes over it.
  const int64_t block =
      std::max<int64_t>(4, std::min<int64_t>(1024, (192 << 10) / (dpad * 4)) / 4 * 4);
  using ST = typename std::conditional<std::is_same<QT, float>::value, float, KT>::type;
  std::vector<ST> scratch(direct ? 0 : block * dpad);
  for (int64_t r0 = n0; r0 < n1; r0 += block) {
    const int64_t rows = std::min(block, n1 - r0);
    if (direct) {
      score_block<1>(qpad, dpad, gid, nq, keys + r0 * ldk, ldk, rows, r0, hs, t, ex);
    } else {
      if constexpr (std::is_same<QT, float>::value)
        widen_rows(keys + r0 * ldk, ldk, rows, d, scratch.data(), dpad);
      else
        copy_rows(keys + r0 * ldk, ldk, rows, d, scratch.data(), dpad);
      score_block<4>(qpad, dpad, gid, nq, scratch.data(), dpad, rows, r0, hs, t, ex);
    }
  }
}

// float64 search (gradcheck and exactness checks): plain loops, parallel over key ranges.
template <typename KT>
void search_range_f64(const RetrieveAttendArgs& a, const int64_t* gid, int64_t nq, int64_t n0,
                      int64_t n1, HeapSet<double>& hs, int t, const Exclusions& ex) {
  const int64_t d = a.keys.shape[1];
  const int64_t ldk = a.keys.strides[0];
  const int64_t ldq = a.query.strides[0];
  const KT* keys = a.keys.ptr<const KT>();
  const double* q = a.query.ptr<const double>();
  for (int64_t i = 0; i < nq; ++i) {
    TopKHeap<double> h = hs.heap(t, i);
    const double* qb = q + gid[i] * ldq;
    for (int64_t n = n0; n < n1; ++n) {
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
#pragma omp parallel for num_threads(threads) schedule(static)
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

// One pass over the keys for the queries gid[0..nq); QT picks the tile kind (see search_range).
template <typename Acc, typename QT, typename KT>
void search_pass(const RetrieveAttendArgs& a, const Exclusions& ex, const int64_t* gid, int64_t nq,
                 int threads) {
  const int64_t N = a.keys.shape[0], d = a.query.shape[1], k = a.k;
  HeapSet<Acc> hs(threads, nq, k);
  // float tiles step VW columns; vdpbf16ps tiles step 2 x VW.
  const int64_t dpad = round_up(d, std::is_same<QT, float>::value ? VW : 2 * VW);
  std::vector<QT> qpad;
  if constexpr (std::is_same<Acc, float>::value) {
    qpad.assign(nq * dpad, QT{});
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
      }
    }
  }
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    // Ranges start on multiples of 4 rows so that tiles stay whole.
    const int64_t per = round_up((N + threads - 1) / threads, 4);
    const int64_t n0 = std::min(N, t * per), n1 = std::min(N, n0 + per);
    for (int64_t i = 0; i < nq; ++i) hs.heap(t, i).reset(std::numeric_limits<Acc>::quiet_NaN());
    if constexpr (std::is_same<Acc, float>::value)
      search_range<QT, KT>(a, qpad.data(), dpad, gid, nq, n0, n1, hs, t, ex);
    else
      search_range_f64<KT>(a, gid, nq, n0, n1, hs, t, ex);
  }
  const int64_t short_query = merge_heaps<Acc, KT>(a, hs, threads, gid, nq);
  if (short_query >= 0) {
    const int64_t excluded = ex.any ? ex.start[short_query + 1] - ex.start[short_query] : 0;
    throw std::invalid_argument("k=" + std::to_string(k) + " exceeds the " +
                                std::to_string(N - excluded) + " selectable rows of query " +
                                std::to_string(short_query) + " (N=" + std::to_string(N) +
                                " minus " + std::to_string(excluded) + " excluded)");
  }
}

template <typename Acc, typename KT>
void search(const RetrieveAttendArgs& a, const Exclusions& ex) {
  const int64_t B = a.query.shape[0], N = a.keys.shape[0], d = a.query.shape[1], k = a.k;
  // Below ~16K rows per thread the fork/merge costs more than it saves.
  const int threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, N / 16384)));
  // Bound heap memory (threads x queries x k entries) to about 64 MiB per pass over the keys.
  const int64_t per_query = static_cast<int64_t>(threads) * k * (sizeof(Acc) + 8);
  const int64_t chunk = std::max<int64_t>(1, (64 << 20) / per_query);
  // Queries split by tile kind. With bfloat16 keys on a CPU with AVX512-BF16, a query whose
  // values are all exact in bfloat16 is scored with vdpbf16ps (exact products, float32 sums);
  // the choice depends on the query alone, so results stay independent of the batch.
  std::vector<int64_t> dot_ids, float_ids;
  for (int64_t b = 0; b < B; ++b) {
    bool dot = false;
    if constexpr (kHasBf16Dot && std::is_same<Acc, float>::value && std::is_same<KT, bf16_t>::value)
      dot = exact_in_bf16(a.query.ptr<const float>() + b * a.query.strides[0], d);
    (dot ? dot_ids : float_ids).push_back(b);
  }
  for (int64_t i = 0; i < static_cast<int64_t>(float_ids.size()); i += chunk)
    search_pass<Acc, float, KT>(a, ex, float_ids.data() + i,
                                std::min<int64_t>(chunk, float_ids.size() - i), threads);
  if constexpr (kHasBf16Dot && std::is_same<Acc, float>::value && std::is_same<KT, bf16_t>::value)
    for (int64_t i = 0; i < static_cast<int64_t>(dot_ids.size()); i += chunk)
      search_pass<Acc, bf16_t, KT>(a, ex, dot_ids.data() + i,
                                   std::min<int64_t>(chunk, dot_ids.size() - i), threads);
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
  const Exclusions ex = make_exclusions(a.exclude, a.query.shape[0]);
  with_dtype(a.keys.dtype, [&](auto kt) {
    using KT = decltype(kt);
    if constexpr (std::is_same<Acc, float>::value && std::is_same<KT, double>::value)
      throw std::invalid_argument("float64 keys need a float64 query");
    else
      search<Acc, KT>(a, ex);
  });
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
  if (a.query.dtype == DType::f64)
    run<double>(a);
  else
    run<float>(a);
}

}  // namespace reco::cpu::RECO_LEVEL_NS
