// Argument checks and the choice of SIMD level at run time.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "retrieve_attend.h"

namespace reco::cpu {
namespace {

bool cpu_has(Level level) {
#if defined(__x86_64__) || defined(_M_X64)
  switch (level) {
    case Level::generic: return true;
    case Level::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Level::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case Level::avx512bf16: return cpu_has(Level::avx512) && __builtin_cpu_supports("avx512bf16");
    default: return false;
  }
#elif defined(__aarch64__) || defined(_M_ARM64)
  // Advanced SIMD (NEON) is part of every AArch64 CPU that Linux, macOS or Windows run on.
  return level == Level::generic || level == Level::neon;
#else
  return level == Level::generic;
#endif
}

bool compiled(Level level) {
  switch (level) {
    case Level::generic: return true;
#if defined(RECO_HAVE_AVX2)
    case Level::avx2: return true;
#endif
#if defined(RECO_HAVE_AVX512)
    case Level::avx512: return true;
#endif
#if defined(RECO_HAVE_AVX512BF16)
    case Level::avx512bf16: return true;
#endif
#if defined(RECO_HAVE_NEON)
    case Level::neon: return true;
#endif
    default: return false;
  }
}

std::string shape_str(const TensorView& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + "]";
}

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

void expect(const TensorView& t, const char* name, int ndim) {
  if (t.device_type != 1) fail(std::string(name) + " must be on the CPU");
  if (t.ndim != ndim)
    fail(std::string(name) + " must have " + std::to_string(ndim) + " dimensions, got shape " +
         shape_str(t));
  if (t.strides[ndim - 1] != 1 && t.shape[ndim - 1] > 1)
    fail(std::string(name) + " must have unit stride in its last dimension");
}

bool is_float(DType t) {
  return t == DType::f32 || t == DType::f16 || t == DType::bf16 || t == DType::f64;
}

void expect_contiguous(const TensorView& t, const char* name) {
  int64_t want = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    if (t.shape[i] != 1 && t.strides[i] != want) fail(std::string(name) + " must be contiguous");
    want *= t.shape[i];
  }
}

}  // namespace

const char* level_name(Level level) {
  switch (level) {
    case Level::generic: return "generic";
    case Level::avx2: return "avx2";
    case Level::avx512: return "avx512";
    case Level::avx512bf16: return "avx512bf16";
    case Level::neon: return "neon";
  }
  return "?";
}

int available_levels(Level* out, int capacity) {
  int n = 0;
  for (Level l : {Level::generic, Level::avx2, Level::avx512, Level::avx512bf16, Level::neon})
    if (compiled(l) && cpu_has(l) && n < capacity) out[n++] = l;
  return n;
}

Level default_level() {
  Level levels[kMaxLevels];
  const int n = available_levels(levels, kMaxLevels);
  const char* env = std::getenv("RECO_CPU_LEVEL");
  if (env != nullptr && *env != '\0') {
    for (int i = 0; i < n; ++i)
      if (std::strcmp(env, level_name(levels[i])) == 0) return levels[i];
    fail(std::string("RECO_CPU_LEVEL=") + env +
         " is not a SIMD level this build and CPU support (see reco._C.cpu_levels())");
  }
  return levels[n - 1];
}

void check_exclude(const TensorView& exclude, int64_t B, int64_t N) {
  if (!exclude.present()) return;
  expect(exclude, "exclude", 2);
  if (exclude.dtype != DType::i64) fail("exclude must be int64");
  if (exclude.shape[0] != B) fail("exclude " + shape_str(exclude) + " must be [B, E]");
  const int64_t E = exclude.shape[1];
  const int64_t* e = exclude.ptr<const int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < E; ++j) {
      const int64_t r = e[b * exclude.strides[0] + j];
      if (r < -1 || r >= N)
        fail("exclude[" + std::to_string(b) + ", " + std::to_string(j) +
             "] = " + std::to_string(r) + " is not a row of keys (N=" + std::to_string(N) +
             ") nor -1 padding");
    }
}

void check_allow(const TensorView& allow, int64_t N) {
  if (!allow.present()) return;
  if (allow.device_type != 1) fail("allow must be on the CPU");
  if (allow.dtype != DType::u8) fail("allow must be a bool (or uint8) array");
  if (allow.ndim != 1 || allow.shape[0] != N)
    fail("allow " + shape_str(allow) + " must be [N] with N=" + std::to_string(N) +
         " (one flag per row of keys)");
  if (allow.strides[0] != 1 && N > 1) fail("allow must be contiguous");
}

void check_args(const RetrieveAttendArgs& a) {
  expect(a.query, "query", 2);
  expect(a.keys, "keys", 2);
  const bool attend = a.values.present();  // absent: the search alone (indices and scores)
  if (attend) expect(a.values, "values", 2);
  if (a.query.dtype != DType::f32 && a.query.dtype != DType::f64)
    fail("query must be float32 or float64 at the kernel boundary");
  if (!is_float(a.keys.dtype)) fail("keys must be a floating-point array");
  if (attend && !is_float(a.values.dtype)) fail("values must be a floating-point array");
  const int64_t B = a.query.shape[0], d = a.query.shape[1], N = a.keys.shape[0];
  const int64_t dv = attend ? a.values.shape[1] : 1;
  if (a.keys.shape[1] != d)
    fail("keys " + shape_str(a.keys) + " and query " + shape_str(a.query) + " differ in d");
  if (attend && a.values.shape[0] != N)
    fail("values " + shape_str(a.values) + " and keys " + shape_str(a.keys) + " differ in N");
  if (N < 1 || d < 1 || dv < 1) fail("keys and values must be non-empty");
  if (!attend && (a.attn_query.present() || a.output.present() || a.weights.present()))
    fail("without values there is no attention: attn_query, output and weights must be absent");
  if (a.k < 1 || a.k > N)
    fail("k=" + std::to_string(a.k) + " must be in [1, N=" + std::to_string(N) + "]");
  if (a.k > (int64_t(1) << 30)) fail("k is too large");
  if (!(a.temperature > 0.0) || !std::isfinite(a.temperature))
    fail("temperature must be finite and > 0");
  if (a.num_threads < 1) fail("num_threads must be >= 1");
  if (a.query.strides[0] < d && B > 1) fail("query rows must not overlap");
  int64_t H = 1;
  if (a.attn_query.present()) {
    expect(a.attn_query, "attn_query", 3);
    expect_contiguous(a.attn_query, "attn_query");
    if (a.attn_query.dtype != a.query.dtype) fail("attn_query must have the query's dtype");
    if (a.attn_query.shape[0] != B || a.attn_query.shape[2] != dv)
      fail("attn_query " + shape_str(a.attn_query) + " must be [B, H, dv]");
    H = a.attn_query.shape[1];
    if (H < 1) fail("attn_query must have H >= 1");
  }
  check_exclude(a.exclude, B, N);
  check_allow(a.allow, N);
  const DType acc = a.query.dtype;
  struct Out {
    const TensorView& t;
    const char* name;
    DType dtype;
    int64_t s0, s1, s2;
    int ndim;
  };
  for (const Out& o :
       {Out{a.output, "output", acc, B, H, dv, 3}, Out{a.weights, "weights", acc, B, H, a.k, 3},
        Out{a.indices, "indices", DType::i64, B, a.k, 0, 2},
        Out{a.scores, "scores", acc, B, a.k, 0, 2}}) {
    if (!attend && o.ndim == 3) continue;
    expect(o.t, o.name, o.ndim);
    expect_contiguous(o.t, o.name);
    if (o.t.dtype != o.dtype) fail(std::string(o.name) + " has the wrong dtype");
    const int64_t want[3] = {o.s0, o.s1, o.s2};
    for (int i = 0; i < o.ndim; ++i)
      if (o.t.shape[i] != want[i]) fail(std::string(o.name) + " has the wrong shape");
  }
}

void retrieve_attend(const RetrieveAttendArgs& a, Level level) {
  check_args(a);
  if (a.query.shape[0] == 0) return;
  switch (level) {
#if defined(RECO_HAVE_AVX512BF16)
    case Level::avx512bf16: avx512bf16::retrieve_attend(a); return;
#endif
#if defined(RECO_HAVE_AVX512)
    case Level::avx512: avx512::retrieve_attend(a); return;
#endif
#if defined(RECO_HAVE_AVX2)
    case Level::avx2: avx2::retrieve_attend(a); return;
#endif
#if defined(RECO_HAVE_NEON)
    case Level::neon: neon::retrieve_attend(a); return;
#endif
    default: generic::retrieve_attend(a); return;
  }
}

}  // namespace reco::cpu
