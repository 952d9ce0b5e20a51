// Per-query top-k selection shared by the CPU and CUDA kernels.
//
// Order: larger score first; equal scores go to the lower row; NaN ranks below every number
// (so a corrupt memory row is chosen only when nothing else is left); an empty slot
// (row = kEmptyRow) ranks below everything.
#pragma once
#include <cstdint>

#include "reco/dtype.h"

namespace reco {

constexpr int64_t kEmptyRow = INT64_MAX;

template <typename S>
RECO_HD bool ranks_before(S s, int64_t i, S t, int64_t j) {
  if (s > t) return true;
  if (s == t) return i < j;
  if (s < t) return false;
  // At least one NaN (or an empty slot holding NaN).
  const bool s_nan = !(s == s);
  const bool t_nan = !(t == t);
  if (t_nan && !s_nan) return true;
  if (t_nan && s_nan) return i < j;
  return false;
}

// A bounded min-heap whose root is the worst of the k kept candidates. Slots start empty
// (NaN, kEmptyRow), so the first k candidates always enter.
template <typename S>
struct TopKHeap {
  S* score;
  int64_t* row;
  int k;

  RECO_HD void reset(S nan_value) {
    for (int i = 0; i < k; ++i) {
      score[i] = nan_value;
      row[i] = kEmptyRow;
    }
  }
  RECO_HD S worst_score() const { return score[0]; }

  // Offers a candidate; callers filter first with `s < worst_score()` which is false for NaN.
  RECO_HD void push(S s, int64_t i) {
    if (!ranks_before(s, i, score[0], row[0])) return;
    int pos = 0;
    for (;;) {
      int c = 2 * pos + 1;
      if (c >= k) break;
      // Descend towards the worse child: it must become the parent.
      if (c + 1 < k && ranks_before(score[c], row[c], score[c + 1], row[c + 1])) ++c;
      if (!ranks_before(s, i, score[c], row[c])) break;
      score[pos] = score[c];
      row[pos] = row[c];
      pos = c;
    }
    score[pos] = s;
    row[pos] = i;
  }
};

}  // namespace reco
