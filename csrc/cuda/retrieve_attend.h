// The CUDA fused retrieve-attend: exact top-k search (tensor cores for 16-bit query and keys,
// CUDA cores otherwise), then merge + attention.
// Host API, included by the bindings (compiled without nvcc).
#pragma once
#include <cstdint>
#include <string>

#include "reco/tensor_view.h"

namespace reco::cuda {

// The longest candidate list a call may ask for (k, or the int8 search's candidates), far above
// what shared memory holds; planning rejects more before doing any arithmetic on it.
constexpr int64_t kMaxCandidates = int64_t(1) << 20;

struct Plan {
  int splits = 1;    // thread blocks along N per query block (partial top-k lists)
  int pow2 = 256;    // candidate buffer length: a power of two >= k and >= one tile of rows
  int queries = 1;   // queries per thread block in the CUDA-core search
  bool mma = false;  // the tensor-core search applies (query given as terms, k <= 64)
  bool ok = false;   // false: k too large for shared memory (callers fall back)
};

// How a call is split; the caller allocates the partial lists [B, splits, k] (float32 scores and
// int64 rows) from its own allocator and passes them in.
// terms: how many 16-bit terms of the keys' dtype the caller can give the query as (1: the query
// itself, of the keys' dtype; 2 for float16 or 3 for bfloat16 keys: a float32 query split into
// terms); 0: none (float32 keys), the CUDA-core search.
// Throws std::invalid_argument for k outside [1, kMaxCandidates]. Leaves the current device alone.
Plan plan(int64_t batch, int64_t rows, int64_t dim, int64_t k, int terms, int device);

struct Args {
  TensorView query;        // [B, d] float32, contiguous
  TensorView query_terms;  // [terms, B, d] contiguous, the keys' dtype (int8 codes for the int8
                           // search): for plan.mma, or absent
  TensorView codes;        // [N, d] int8 codes of the keys: the int8 search, or absent
  TensorView key_scales;   // [N] float32 scales of the codes
  TensorView keys;         // [N, d] float32/float16/bfloat16, unit inner stride, any row stride
  TensorView values;       // [N, dv] likewise; absent: the search alone (no attention: attn_query,
                           // output and weights absent too)
  TensorView attn_query;   // [B, H, dv] float32 contiguous, or absent
  TensorView exclude;      // [B, E] int64 contiguous, or absent
  TensorView allow;        // [N] uint8 (bool) contiguous: 0 = never select; or absent
  TensorView output;       // [B, H, dv] float32
  TensorView weights;      // [B, H, k] float32
  TensorView indices;      // [B, k] int64
  TensorView scores;       // [B, k] float32
  TensorView part_scores;  // [B, splits, k] float32 workspace
  TensorView part_rows;    // [B, splits, k] int64 workspace
  int64_t k = 0;
  int64_t candidates = 0;  // >= k: rows the search keeps per query, re-ranked exactly
  double temperature = 1.0;
  Plan plan;
  uintptr_t stream = 0;  // cudaStream_t of the caller
};

// Launches the search and the merge + attention kernels on args.stream (no host synchronisation).
// Throws std::runtime_error with the CUDA error string when a launch fails.
void retrieve_attend(const Args& args);

}  // namespace reco::cuda
