// Which rows each query may select, for the CPU searches: per-query exclusions (sorted) and the
// allow mask shared by all queries (validated by check_exclude / check_allow first).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "reco/tensor_view.h"

namespace reco::cpu {

struct Exclusions {
  std::vector<int64_t> rows;
  std::vector<int64_t> start;  // B + 1 offsets
  bool any = false;
  // allow[n] == 0: row n is never selected; null when every row is allowed, or when the search
  // visits only allowed rows (a gathered row list).
  const uint8_t* allow = nullptr;

  bool contains(int64_t b, int64_t row) const {
    return any && std::binary_search(rows.begin() + start[b], rows.begin() + start[b + 1], row);
  }
  bool rejects(int64_t b, int64_t row) const {
    return (allow != nullptr && allow[row] == 0) || contains(b, row);
  }
};

// exclude: [B, E] int64 (-1 = padding) or absent.
inline Exclusions make_exclusions(const TensorView& exclude, int64_t B) {
  Exclusions ex;
  ex.start.assign(B + 1, 0);
  if (!exclude.present() || exclude.shape[1] == 0) return ex;
  ex.any = true;
  const int64_t E = exclude.shape[1];
  const int64_t* e = exclude.ptr<const int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* row = e + b * exclude.strides[0];
    for (int64_t j = 0; j < E; ++j)
      if (row[j] >= 0) ex.rows.push_back(row[j]);
    std::sort(ex.rows.begin() + ex.start[b], ex.rows.end());
    ex.rows.erase(std::unique(ex.rows.begin() + ex.start[b], ex.rows.end()), ex.rows.end());
    ex.start[b + 1] = static_cast<int64_t>(ex.rows.size());
  }
  return ex;
}

// The rows an allow mask leaves. mask: null (no mask, or every row allowed) or allow's bytes;
// rows: the allowed rows in ascending order, filled only when gathered (few enough allowed).
struct Allowed {
  int64_t count = 0;
  const uint8_t* mask = nullptr;
  std::vector<int64_t> rows;
  bool gathered = false;
};

// Below this fraction of allowed rows the searches visit a gathered list of the allowed rows
// (read in place through the list, or copied block by block as the compute-bound path copies
// every block); above it they scan every row and test the mask where a score would enter a heap.
// Measured crossovers (benchmarks/bench_filter.py --crossover): near 35% for a few queries
// (memory-bound: gathered rows are fetched out of order), above 90% for many (compute-bound).
// RECO_GATHER_BELOW (a fraction in [0, 1]) overrides both, for benchmarks of the crossover.
constexpr double kGatherBelowFewQueries = 0.3;
constexpr double kGatherBelowManyQueries = 0.8;

inline double gather_below(bool few_queries) {
  const char* env = std::getenv("RECO_GATHER_BELOW");
  if (env == nullptr || *env == '\0')
    return few_queries ? kGatherBelowFewQueries : kGatherBelowManyQueries;
  char* end = nullptr;
  const double v = std::strtod(env, &end);
  if (end == env || *end != '\0' || !(v >= 0.0 && v <= 1.0))
    throw std::invalid_argument(std::string("RECO_GATHER_BELOW=") + env +
                                " must be a fraction in [0, 1] (or unset)");
  return v;
}

// few_queries: the batch is scored in the memory-bound regime (rows read in place).
inline Allowed make_allowed(const TensorView& allow, int64_t N, bool few_queries) {
  Allowed a;
  a.count = N;
  if (!allow.present()) return a;
  const uint8_t* m = allow.ptr<const uint8_t>();
  int64_t count = 0;
  for (int64_t n = 0; n < N; ++n) count += m[n] != 0;
  a.count = count;
  if (count == N) return a;
  a.mask = m;
  if (static_cast<double>(count) < gather_below(few_queries) * static_cast<double>(N)) {
    a.gathered = true;
    a.rows.reserve(count);
    for (int64_t n = 0; n < N; ++n)
      if (m[n] != 0) a.rows.push_back(n);
  }
  return a;
}

// The rows query b may select: allowed and not excluded.
inline int64_t selectable_rows(const Exclusions& ex, const Allowed& al, int64_t b) {
  int64_t n = al.count;
  if (ex.any)
    for (int64_t i = ex.start[b]; i < ex.start[b + 1]; ++i)
      n -= al.mask == nullptr || al.mask[ex.rows[i]] != 0;
  return n;
}

// The error of a query left with fewer than k selectable rows, the same at every CPU entry.
inline std::string short_query_message(int64_t k, int64_t b, const Exclusions& ex,
                                       const Allowed& al, int64_t N) {
  const int64_t excluded = ex.any ? ex.start[b + 1] - ex.start[b] : 0;
  return "k=" + std::to_string(k) + " exceeds the " + std::to_string(selectable_rows(ex, al, b)) +
         " selectable rows of query " + std::to_string(b) + " (N=" + std::to_string(N) + ", " +
         std::to_string(al.count) + " allowed, " + std::to_string(excluded) + " excluded)";
}

}  // namespace reco::cpu
