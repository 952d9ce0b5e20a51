// The CPU retrieve-attend op: arguments, SIMD levels and the entry point.
#pragma once
#include <cstdint>
#include <string>

#include "reco/tensor_view.h"

namespace reco::cpu {

// Inputs are validated by check_args() before any level runs. Compute type `Acc` is float, or
// double when the query is float64 (then attn_query and the float outputs are float64 too).
struct RetrieveAttendArgs {
  TensorView query;       // [B, d] float32 | float64, rows contiguous
  TensorView keys;        // [N, d] any float dtype, inner stride 1
  TensorView values;      // [N, dv] any float dtype, inner stride 1; absent: the search alone
                          // (attn_query, output and weights absent too)
  TensorView attn_query;  // [B, H, dv] same dtype as query, contiguous; ndim 0 if absent
  TensorView exclude;     // [B, E] int64, rows contiguous; ndim 0 if absent
  TensorView allow;       // [N] uint8 (bool): 0 = never select; ndim 0 if absent
  int64_t k = 0;
  double temperature = 1.0;
  int num_threads = 1;
  TensorView output;   // [B, H, dv] Acc, contiguous
  TensorView weights;  // [B, H, k] Acc, contiguous
  TensorView indices;  // [B, k] int64, contiguous
  TensorView scores;   // [B, k] Acc, contiguous
};

// x86-64: generic, avx2, avx512, avx512bf16; arm64: generic, neon. Each level above generic
// exists on one architecture only, so the order of the values is the order within it.
enum class Level : int { generic = 0, avx2 = 1, avx512 = 2, avx512bf16 = 3, neon = 4 };
constexpr int kMaxLevels = 5;

const char* level_name(Level level);
// Levels compiled into this build and supported by this CPU, lowest first.
int available_levels(Level* out, int capacity);
// The level used when none is asked for: RECO_CPU_LEVEL if set (one of available_levels), else
// the best.
Level default_level();

void check_args(const RetrieveAttendArgs& a);
// exclude (absent, or [B, E] int64 of rows in [0, N) or -1): std::invalid_argument otherwise.
void check_exclude(const TensorView& exclude, int64_t B, int64_t N);
// allow (absent, or [N] bool/uint8 on the CPU, contiguous): std::invalid_argument otherwise.
void check_allow(const TensorView& allow, int64_t N);
void retrieve_attend(const RetrieveAttendArgs& a, Level level);

// The coarse search of fused_retrieve_attend_int8 (coarse_int8.cpp): per query, the `candidates`
// rows of best float32(query_codes . codes[n]) * scales[n], best first; rows -1 (scores NaN)
// where fewer rows are selectable. Throws std::invalid_argument for an exclude row out of range.
struct CoarseInt8Args {
  TensorView query_codes;  // [B, d] int8, inner stride 1
  TensorView codes;        // [N, d] int8, inner stride 1
  TensorView scales;       // [N] float32, contiguous
  TensorView exclude;      // [B, E] int64; ndim 0 if absent
  TensorView allow;        // [N] uint8 (bool); ndim 0 if absent
  int64_t candidates = 0;
  int num_threads = 1;
  TensorView rows;    // [B, candidates] int64
  TensorView scores;  // [B, candidates] float32
};
void coarse_int8(const CoarseInt8Args& a);
// Whether coarse_int8 uses AVX512-VNNI here (the CPU has it, and the level in use is AVX-512).
bool coarse_int8_uses_vnni();

// Per-level implementations (one translation unit each, compiled with that level's flags).
namespace generic {
void retrieve_attend(const RetrieveAttendArgs& a);
}
namespace avx2 {
void retrieve_attend(const RetrieveAttendArgs& a);
}
namespace avx512 {
void retrieve_attend(const RetrieveAttendArgs& a);
}
namespace avx512bf16 {
void retrieve_attend(const RetrieveAttendArgs& a);
}
namespace neon {
void retrieve_attend(const RetrieveAttendArgs& a);
}

}  // namespace reco::cpu
