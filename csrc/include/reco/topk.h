// Per-query top-k selection of the CPU kernels: a bounded heap in the order of reco/order.h.
#pragma once
#include <cstdint>

#include "reco/dtype.h"
#include "reco/order.h"

namespace reco {

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
