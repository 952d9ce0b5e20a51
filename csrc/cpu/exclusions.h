// Each query's excluded rows, sorted, for the CPU searches (validated by check_exclude first).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "reco/tensor_view.h"

namespace reco::cpu {

struct Exclusions {
  std::vector<int64_t> rows;
  std::vector<int64_t> start;  // B + 1 offsets
  bool any = false;

  bool contains(int64_t b, int64_t row) const {
    return any && std::binary_search(rows.begin() + start[b], rows.begin() + start[b + 1], row);
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

}  // namespace reco::cpu
