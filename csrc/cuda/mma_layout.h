// The tensor-core search's tiles: where a block keeps them in shared memory, which row each lane
// hands to ldmatrix.x4, and which (query, row) each lane's mma.m16n8k16 accumulator holds.
// Plain C++ as well as CUDA, so that a host test can check the composition against a product.
#pragma once

#include "reco/dtype.h"  // RECO_HD

namespace reco::cuda::mma {

constexpr int kQueries = 64;        // queries per block tile (M)
constexpr int kRows = 256;          // key rows per block tile (N)
constexpr int kChunk = 32;          // elements of d per pipeline stage (two k16 steps)
constexpr int kPitch = kChunk + 8;  // shared row pitch in elements: 80 bytes, so the 8 rows of
                                    // one ldmatrix fall in 8 different 16-byte bank groups
constexpr int kMaxStages = 3;       // cp.async pipeline depth where shared memory allows, else 2
constexpr int kWarpsQ = 2, kWarpsN = 4;
constexpr int kThreads = 32 * kWarpsQ * kWarpsN;
constexpr int kWarpQ = kQueries / kWarpsQ;  // 32 queries per warp: 2 m16 tiles
constexpr int kWarpN = kRows / kWarpsN;     // 64 rows per warp: 8 n8 tiles
constexpr int kMT = kWarpQ / 16, kNT = kWarpN / 8;
constexpr int kList = 64;                   // running top list per query (so k <= 64)
constexpr int kStaging = 64;                // candidates waiting to be merged into it
constexpr int kEntries = kList + kStaging;  // a power of two: the merge sorts them all
constexpr int kMaxK = kList;
// One n8 tile of every warp adds at most this many candidates per query between two checks.
constexpr int kPerStep = kWarpsN * 8;
static_assert(kStaging >= 2 * kPerStep, "a check must leave room for one more step");

// Element offset in a stage's query tile of the row lane passes to ldmatrix.x4 for m16 tile mt
// of warp row wq, at k16 step ks. Matrices 0..3 = (rows 0-7, k 0-7), (rows 8-15, k 0-7),
// (rows 0-7, k 8-15), (rows 8-15, k 8-15): registers a0..a3 of mma.m16n8k16 (A row-major).
RECO_HD int a_offset(int wq, int mt, int ks, int lane) {
  const int row = wq * kWarpQ + mt * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
  return row * kPitch + ks * 16 + (lane >> 4) * 8;
}

// The same for the key tile: one ldmatrix.x4 loads n8 tiles 2p and 2p+1 of warp column wn.
// Matrices 0..3 = (tile 2p, k 0-7), (tile 2p, k 8-15), (tile 2p+1, k 0-7), (tile 2p+1, k 8-15):
// registers b0, b1 of both tiles (B column-major = keys row-major).
RECO_HD int b_offset(int wn, int p, int ks, int lane) {
  const int row = wn * kWarpN + p * 16 + (lane >> 4) * 8 + (lane & 7);
  return row * kPitch + ks * 16 + ((lane >> 3) & 1) * 8;
}

// Query (within the block tile) of accumulator i (0..3) of m16 tile mt, and key row (within the
// block tile) of accumulator i of n8 tile nt.
RECO_HD int c_query(int wq, int mt, int lane, int i) {
  return wq * kWarpQ + mt * 16 + (lane >> 2) + (i >> 1) * 8;
}
RECO_HD int c_row(int wn, int nt, int lane, int i) {
  return wn * kWarpN + nt * 8 + (lane & 3) * 2 + (i & 1);
}

}  // namespace reco::cuda::mma
