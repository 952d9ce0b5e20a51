// THE selection order of every reco kernel: the CPU searches and merges, the CUDA searches and
// their merge (host and device: RECO_HD).
//
// a ranks before b when
//   - b is an empty slot and a is not: empty slots rank last (their scores are ignored);
//   - both are numbers and a's score is higher, or equal with a lower row (ties to the lower row);
//   - a is a number and b is NaN (NaN below every number), or both are NaN and a's row is lower.
// The one sentinel: an empty slot is a row below 0 (kEmptyRow, -1), whatever its score; kernels
// fill empty slots with (NaN or -inf, kEmptyRow) and never return one as a selected row.
#pragma once
#include <cstdint>

#include "reco/dtype.h"  // RECO_HD

namespace reco {

constexpr int64_t kEmptyRow = -1;

template <typename S, typename R>
RECO_HD bool ranks_before(S sa, R ra, S sb, R rb) {
  if (ra < 0) return false;
  if (rb < 0) return true;
  const bool na = !(sa == sa), nb = !(sb == sb);
  if (na || nb) return na && nb ? ra < rb : nb;
  return sa > sb || (sa == sb && ra < rb);
}

}  // namespace reco
