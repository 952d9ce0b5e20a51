// Runs the CPU retrieve-attend kernel (csrc/cpu) at every SIMD level this build and CPU have, on
// random cases, and checks each result against an independent float64 reference written here:
// float32, bfloat16 and float16 keys (and a float64 query), several k, d with and without a
// vector tail, the streamed (few queries) and copied-block (many) paths, one and two threads,
// exclude rows, allow masks (scanned and gathered), exact ties, a NaN row, subnormal inputs and
// products (also with the caller in flush-to-zero mode), too few selectable rows, and the
// attention over the selected rows. Built natively for the x86-64 levels and cross-compiled for
// arm64 (run under qemu-aarch64) for the neon level; see tests/test_cpu_levels.py.
//
// Usage: cpu_levels_check --levels    prints the levels it would run;
//        cpu_levels_check --list      prints the names of the cases;
//        cpu_levels_check [LEVEL...]  runs every case at those levels (default: all), prints one
//                                     "ok LEVEL CASES" line per level, or FAIL lines and exits 1.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "cpu/retrieve_attend.h"

namespace {

using reco::DType;
using reco::TensorView;
using reco::cpu::Level;

// ---- inputs: each element's value as a double, and its bits in the key dtype ----------------

uint16_t bf16_bits(double v) {  // v exact in bfloat16 (NaN: the quiet NaN)
  if (std::isnan(v)) return 0x7fc0;
  const float f = static_cast<float>(v);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}

double round_bf16(double v) {  // to nearest, ties to even, by scaling (no bit tricks)
  if (v == 0 || std::isnan(v)) return v;
  int e;
  std::frexp(v, &e);  // |v| in [2^(e-1), 2^e)
  const double quantum = std::ldexp(1.0, std::max(e - 8, -133));
  return std::nearbyint(v / quantum) * quantum;
}

double round_half(double v) {
  if (v == 0 || std::isnan(v)) return v;
  int e;
  std::frexp(v, &e);
  const double quantum = std::ldexp(1.0, std::max(e - 11, -24));
  return std::nearbyint(v / quantum) * quantum;
}

uint16_t half_bits(double v) {  // v exact in float16, |v| < 65504 (NaN: the quiet NaN)
  if (std::isnan(v)) return 0x7e00;
  const uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  const double a = std::fabs(v);
  if (a == 0) return sign;
  if (a < std::ldexp(1.0, -14)) return sign | static_cast<uint16_t>(a / std::ldexp(1.0, -24));
  int e;
  std::frexp(a, &e);  // a = m * 2^(e-1), m in [1, 2)
  const double m = a / std::ldexp(1.0, e - 1);
  return sign | static_cast<uint16_t>((e - 1 + 15) << 10) |
         static_cast<uint16_t>(std::lround((m - 1) * 1024));
}

// A [rows, cols] array of one float dtype, with its exact values as doubles.
struct Matrix {
  DType dtype;
  int64_t rows, cols;
  std::vector<double> val;  // the values the kernel sees
  std::vector<unsigned char> bytes;

  Matrix(DType t, int64_t r, int64_t c) : dtype(t), rows(r), cols(c), val(r * c) {}
  // Rounds val to the dtype (so val is then exact) and stores the bits.
  void store() {
    const int size = reco::dtype_size(dtype);
    bytes.assign(val.size() * size, 0);
    for (size_t i = 0; i < val.size(); ++i) {
      double& v = val[i];
      if (dtype == DType::f32) {
        const float f = static_cast<float>(v);
        v = f;
        std::memcpy(&bytes[i * 4], &f, 4);
      } else if (dtype == DType::f64) {
        std::memcpy(&bytes[i * 8], &v, 8);
      } else {
        v = dtype == DType::bf16 ? round_bf16(v) : round_half(v);
        const uint16_t b = dtype == DType::bf16 ? bf16_bits(v) : half_bits(v);
        std::memcpy(&bytes[i * 2], &b, 2);
      }
    }
  }
  TensorView view() {
    TensorView t;
    t.data = bytes.data();
    t.dtype = dtype;
    t.ndim = 2;
    t.shape[0] = rows;
    t.shape[1] = cols;
    t.strides[0] = cols;
    t.strides[1] = 1;
    return t;
  }
};

template <typename T>
TensorView view_of(std::vector<T>& v, DType t, std::vector<int64_t> shape) {
  TensorView out;
  out.data = v.data();
  out.dtype = t;
  out.ndim = static_cast<int>(shape.size());
  int64_t stride = 1;
  for (int i = out.ndim - 1; i >= 0; --i) {
    out.shape[i] = shape[i];
    out.strides[i] = stride;
    stride *= shape[i];
  }
  return out;
}

// ---- one case -----------------------------------------------------------------------------

struct Case {
  std::string name;
  int64_t B, N, d, k;
  DType key_dtype = DType::f32;
  DType query_dtype = DType::f32;
  int threads = 1;
  int64_t excluded = 0;    // exclude columns per query (random rows and -1 padding)
  double allow_frac = -1;  // < 0: no mask; else the fraction of rows allowed
  bool exact = false;      // every score exact in float32: the selection must be the reference's
  bool values = false;     // attend over values (with attn_query when heads > 0)
  int heads = 0;
  bool flush_caller = false;  // the calling thread in flush-to-zero mode
  bool expect_short = false;  // some query has fewer than k selectable rows: an error
  // Fills keys and queries (val, before store()).
  void (*fill)(Matrix& q, Matrix& keys, std::mt19937& gen) = nullptr;
};

void fill_normal(Matrix& q, Matrix& keys, std::mt19937& gen) {
  std::normal_distribution<double> n(0.0, 1.0);
  for (double& v : q.val) v = n(gen);
  for (double& v : keys.val) v = n(gen);
}

// Small integers, the second half of the rows a copy of the first: scores are exact and tie.
void fill_ties(Matrix& q, Matrix& keys, std::mt19937& gen) {
  for (double& v : q.val) v = static_cast<int>(gen() % 5) - 2;
  const int64_t half = keys.rows / 2;
  for (int64_t r = 0; r < keys.rows; ++r)
    for (int64_t c = 0; c < keys.cols; ++c)
      keys.val[r * keys.cols + c] =
          r < half ? static_cast<int>(gen() % 5) - 2 : keys.val[(r - half) * keys.cols + c];
}

// fill_ties with row 7 all NaN: it ranks below every number.
void fill_nan_row(Matrix& q, Matrix& keys, std::mt19937& gen) {
  fill_ties(q, keys, gen);
  for (int64_t c = 0; c < keys.cols; ++c) keys.val[7 * keys.cols + c] = std::nan("");
}

// Keys are small integers times 2^-130 (subnormal in float32 and bfloat16), queries small
// integers times 2^-12: every product and partial sum is a multiple of 2^-142, exact when
// subnormals are honoured, zero (and so a tie) when flushed.
void fill_subnormal(Matrix& q, Matrix& keys, std::mt19937& gen) {
  for (double& v : q.val) v = std::ldexp(static_cast<int>(gen() % 15) - 7, -12);
  for (double& v : keys.val) v = std::ldexp(static_cast<int>(gen() % 31) - 15, -130);
}

// float16 subnormals (integers times 2^-24), widened exactly; queries small integers.
void fill_half_subnormal(Matrix& q, Matrix& keys, std::mt19937& gen) {
  for (double& v : q.val) v = static_cast<int>(gen() % 15) - 7;
  for (double& v : keys.val) v = std::ldexp(static_cast<int>(gen() % 2001) - 1000, -24);
}

std::string num(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", x);
  return buf;
}

// a ranks before b in the op's order (score descending, NaN last, ties to the lower row).
bool before(double sa, int64_t ra, double sb, int64_t rb) {
  const bool na = std::isnan(sa), nb = std::isnan(sb);
  if (na || nb) return na && nb ? ra < rb : nb;
  return sa > sb || (sa == sb && ra < rb);
}

void set_flush_to_zero(bool on) {
#if defined(__x86_64__)
  const unsigned bits = 0x8040;  // FTZ | DAZ
  _mm_setcsr(on ? (_mm_getcsr() | bits) : (_mm_getcsr() & ~bits));
#elif defined(__aarch64__)
  uint64_t fpcr;
  __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
  const uint64_t bits = (uint64_t(1) << 24) | (uint64_t(1) << 19);  // FZ | FZ16
  fpcr = on ? (fpcr | bits) : (fpcr & ~bits);
  __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr));
#else
  (void)on;
#endif
}

// The reference of one query: exact scores (and sums of |products|) of every row, which rows it
// may select, and those rows in the op's order.
struct Reference {
  std::vector<double> exact, magnitude;
  std::vector<char> selectable;
  std::vector<int64_t> order;
};

// Runs case c at each of `levels`; returns, per level, "" or what went wrong.
std::vector<std::string> run_case(const Case& c, const std::vector<Level>& levels, unsigned seed) {
  std::mt19937 gen(seed);
  const int64_t B = c.B, N = c.N, d = c.d, k = c.k;
  Matrix q(c.query_dtype, B, d), keys(c.key_dtype, N, d);
  c.fill(q, keys, gen);
  q.store();
  keys.store();

  // exclude: random rows and -1 padding; allow: a random mask of about allow_frac.
  const int64_t E = c.excluded;
  std::vector<int64_t> exclude(B * E);
  for (int64_t& e : exclude) e = static_cast<int64_t>(gen() % (N + 1)) - 1;
  std::vector<uint8_t> allow(c.allow_frac >= 0 ? N : 0);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (uint8_t& a : allow) a = u(gen) < c.allow_frac;

  const int64_t dv = 5, H = c.heads > 0 ? c.heads : 1;
  Matrix values(DType::bf16, c.values ? N : 0, dv);
  std::normal_distribution<double> n01(0.0, 1.0);
  for (double& v : values.val) v = n01(gen);
  values.store();
  std::vector<double> aq64(c.heads > 0 ? B * H * dv : 0);
  for (double& v : aq64) v = n01(gen);
  const bool f64 = c.query_dtype == DType::f64;
  std::vector<float> aq32(aq64.begin(), aq64.end());
  for (size_t i = 0; i < aq64.size(); ++i) aq64[i] = f64 ? aq64[i] : aq32[i];

  std::vector<Reference> ref(c.expect_short ? 0 : B);
  for (size_t b = 0; b < ref.size(); ++b) {
    Reference& R = ref[b];
    R.selectable.assign(N, 1);
    for (int64_t j = 0; j < E; ++j)
      if (exclude[b * E + j] >= 0) R.selectable[exclude[b * E + j]] = 0;
    if (!allow.empty())
      for (int64_t r = 0; r < N; ++r) R.selectable[r] &= allow[r] != 0;
    R.exact.resize(N);
    R.magnitude.resize(N);
    for (int64_t r = 0; r < N; ++r) {
      double s = 0, m = 0;
      for (int64_t i = 0; i < d; ++i) {
        const double p = q.val[b * d + i] * keys.val[r * d + i];
        s += p;
        m += std::fabs(p);
      }
      R.exact[r] = s;
      R.magnitude[r] = m;
      if (R.selectable[r]) R.order.push_back(r);
    }
    std::stable_sort(R.order.begin(), R.order.end(),
                     [&](int64_t x, int64_t y) { return before(R.exact[x], x, R.exact[y], y); });
  }

  std::vector<std::string> result;
  for (Level level : levels) {
    reco::cpu::RetrieveAttendArgs a;
    a.query = q.view();
    a.keys = keys.view();
    if (E > 0) a.exclude = view_of(exclude, DType::i64, {B, E});
    if (!allow.empty()) a.allow = view_of(allow, DType::u8, {N});
    a.k = k;
    a.temperature = 0.7;
    a.num_threads = c.threads;
    const DType acc = f64 ? DType::f64 : DType::f32;
    std::vector<int64_t> indices(B * k, -2);
    std::vector<double> scores64(B * k), weights64(c.values ? B * H * k : 0),
        output64(c.values ? B * H * dv : 0);
    std::vector<float> scores32(B * k), weights32(weights64.size()), output32(output64.size());
    a.indices = view_of(indices, DType::i64, {B, k});
    a.scores = f64 ? view_of(scores64, acc, {B, k}) : view_of(scores32, acc, {B, k});
    if (c.values) {
      a.values = values.view();
      if (c.heads > 0)
        a.attn_query = f64 ? view_of(aq64, acc, {B, H, dv}) : view_of(aq32, acc, {B, H, dv});
      a.weights = f64 ? view_of(weights64, acc, {B, H, k}) : view_of(weights32, acc, {B, H, k});
      a.output = f64 ? view_of(output64, acc, {B, H, dv}) : view_of(output32, acc, {B, H, dv});
    }

    set_flush_to_zero(c.flush_caller);
    std::string error;
    try {
      reco::cpu::retrieve_attend(a, level);
    } catch (const std::invalid_argument& e) {
      error = e.what();
    }
    set_flush_to_zero(false);
    if (!f64)
      for (int64_t i = 0; i < B * k; ++i) scores64[i] = scores32[i];
    const auto check = [&]() -> std::string {
      if (c.expect_short) {
        if (error.find("selectable rows") == std::string::npos)
          return "expected a too-few-selectable-rows error, got '" + error + "'";
        return "";
      }
      if (!error.empty()) return "unexpected error: " + error;
      for (int64_t b = 0; b < B; ++b) {
        const Reference& R = ref[b];
        const std::string at = "query " + std::to_string(b) + ": ";
        // The kernel accumulates in float32 (f64: float64), then re-scores the winners in
        // float64 and rounds once; a row may be missed only within the accumulation error.
        const double unit = f64 ? std::ldexp(1.0, -53) : std::ldexp(1.0, -24);
        const double tol_pick = 2.0 * (d + 2) * unit;  // times a row's magnitude
        const double* got_s = scores64.data() + b * k;
        const int64_t* got_i = indices.data() + b * k;
        std::vector<char> seen(N, 0);
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = got_i[j];
          const std::string pos =
              at + "position " + std::to_string(j) + ", row " + std::to_string(r);
          if (r < 0 || r >= N) return pos + " is not a row";
          if (!R.selectable[r]) return pos + " is excluded or not allowed";
          if (seen[r]) return pos + " is selected twice";
          seen[r] = 1;
          const double want = f64 ? R.exact[r] : static_cast<float>(R.exact[r]);
          const double slack = 4 * d * std::ldexp(1.0, -53) * R.magnitude[r] +
                               (f64 ? 0 : std::fabs(want) * std::ldexp(1.0, -23));
          if (std::isnan(R.exact[r]) ? !std::isnan(got_s[j])
                                     : !(std::fabs(got_s[j] - want) <= slack))
            return pos + ": score " + num(got_s[j]) + ", exact " + num(want);
          if (j > 0 && !before(got_s[j - 1], got_i[j - 1], got_s[j], r))
            return pos + " is out of order";
        }
        if (c.exact) {
          for (int64_t j = 0; j < k; ++j)
            if (got_i[j] != R.order[j])
              return at + "position " + std::to_string(j) + ": row " + std::to_string(got_i[j]) +
                     ", the reference's " + std::to_string(R.order[j]);
        } else {
          const int64_t last = got_i[k - 1];
          for (int64_t r = 0; r < N; ++r) {
            if (!R.selectable[r] || seen[r] || std::isnan(R.exact[r])) continue;
            if (std::isnan(R.exact[last]) ||
                R.exact[r] > R.exact[last] + tol_pick * (R.magnitude[r] + R.magnitude[last]))
              return at + "row " + std::to_string(r) + " (exact " + num(R.exact[r]) +
                     ") was left out for row " + std::to_string(last) + " (exact " +
                     num(R.exact[last]) + ")";
          }
        }

        // Attention over the selected rows: softmax(logits / temperature), the weighted sum.
        if (!c.values) continue;
        for (int64_t h = 0; h < H; ++h) {
          std::vector<double> w(k);
          for (int64_t j = 0; j < k; ++j) {
            double s = got_s[j];
            if (c.heads > 0) {
              s = 0;
              for (int64_t i = 0; i < dv; ++i)
                s += aq64[(b * H + h) * dv + i] * values.val[got_i[j] * dv + i];
            }
            w[j] = s / a.temperature;
          }
          const double m = *std::max_element(w.begin(), w.end());
          double total = 0;
          for (double& x : w) total += (x = std::exp(x - m));
          for (double& x : w) x /= total;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t o = (b * H + h) * k + j;
            const double got = f64 ? weights64[o] : weights32[o];
            if (!(std::fabs(got - w[j]) <= 1e-5 * w[j] + 1e-7))
              return at + "weight " + std::to_string(j) + " = " + num(got) + ", want " + num(w[j]);
          }
          for (int64_t i = 0; i < dv; ++i) {
            double want = 0, scale = 0;
            for (int64_t j = 0; j < k; ++j) {
              want += w[j] * values.val[got_i[j] * dv + i];
              scale += w[j] * std::fabs(values.val[got_i[j] * dv + i]);
            }
            const int64_t o = (b * H + h) * dv + i;
            const double got = f64 ? output64[o] : output32[o];
            if (!(std::fabs(got - want) <= 1e-5 * scale + 1e-7))
              return at + "output " + std::to_string(i) + " = " + num(got) + ", want " + num(want);
          }
        }
      }
      return "";
    };
    result.push_back(check());
  }
  return result;
}

std::vector<Case> cases() {
  std::vector<Case> out;
  const DType key_types[] = {DType::f32, DType::bf16, DType::f16};
  const char* key_names[] = {"f32", "bf16", "f16"};
  struct Shape {
    int64_t B, N, d, k;
    int threads;
  };
  // B <= 8 with d a multiple of the vector width streams rows in place; B > 8 or a d with a tail
  // copies blocks. N >= 32768 runs two threads (for any one level: cases stay small for qemu).
  const Shape shapes[] = {{1, 50, 8, 5, 1},     {3, 1000, 33, 16, 1}, {5, 700, 32, 40, 1},
                          {11, 700, 17, 9, 1},  {20, 2000, 64, 7, 1}, {2, 33000, 16, 10, 2},
                          {9, 33000, 12, 3, 2}, {4, 300, 3, 300, 1}};
  for (int t = 0; t < 3; ++t) {
    for (const Shape& s : shapes) {
      Case c{std::string("normal_") + key_names[t] + "_B" + std::to_string(s.B) + "_N" +
                 std::to_string(s.N) + "_d" + std::to_string(s.d),
             s.B, s.N, s.d, s.k};
      c.key_dtype = key_types[t];
      c.threads = s.threads;
      c.fill = fill_normal;
      out.push_back(c);
      // The same shape with exclusions and each kind of allow mask.
      for (double frac : {0.9, 0.5, 0.1}) {
        if (frac * s.N < 40) continue;  // keep well over k rows selectable
        Case m = c;
        m.name += "_allow" + std::to_string(static_cast<int>(frac * 100));
        m.allow_frac = frac;
        m.excluded = 6;
        m.k = std::min<int64_t>(c.k, static_cast<int64_t>(frac * s.N / 4));
        out.push_back(m);
      }
    }
    for (const Shape& s :
         {Shape{3, 600, 8, 600, 1}, Shape{13, 600, 9, 45, 1}, Shape{2, 33000, 16, 20, 2}}) {
      Case c{std::string("ties_") + key_names[t] + "_B" + std::to_string(s.B) + "_N" +
                 std::to_string(s.N),
             s.B, s.N, s.d, s.k};
      c.key_dtype = key_types[t];
      c.threads = s.threads;
      c.fill = fill_ties;
      c.exact = true;
      out.push_back(c);
      c.name += "_excluded";
      c.excluded = 5;
      c.k = std::min<int64_t>(c.k, s.N - 5);
      out.push_back(c);
    }
    Case nan{std::string("nan_row_") + key_names[t], 3, 200, 8, 200};
    nan.key_dtype = key_types[t];
    nan.fill = fill_nan_row;
    nan.exact = true;
    out.push_back(nan);
    Case att{std::string("attend_") + key_names[t], 6, 900, 24, 12};
    att.key_dtype = key_types[t];
    att.fill = fill_normal;
    att.values = true;
    out.push_back(att);
    att.name += "_heads";
    att.heads = 3;
    out.push_back(att);
  }
  for (int t = 0; t < 2; ++t) {  // float32 and bfloat16 subnormal keys
    for (const Shape& s :
         {Shape{3, 500, 16, 20, 1}, Shape{12, 500, 13, 20, 1}, Shape{2, 33000, 8, 12, 2}}) {
      for (bool flush : {false, true}) {
        Case c{std::string("subnormal_") + key_names[t] + "_B" + std::to_string(s.B) + "_N" +
                   std::to_string(s.N) + (flush ? "_caller_flushes" : ""),
               s.B, s.N, s.d, s.k};
        c.key_dtype = key_types[t];
        c.threads = s.threads;
        c.fill = fill_subnormal;
        c.exact = true;
        c.flush_caller = flush;
        out.push_back(c);
      }
    }
  }
  for (int64_t B : {3, 12}) {
    Case c{"subnormal_f16_B" + std::to_string(B), B, 400, 16, 25};
    c.key_dtype = DType::f16;
    c.fill = fill_half_subnormal;
    c.exact = true;
    c.flush_caller = true;
    out.push_back(c);
  }
  for (DType kt : {DType::f64, DType::f32}) {  // the float64 search (gradcheck's)
    Case c{std::string("query_f64_keys_") + (kt == DType::f64 ? "f64" : "f32"), 4, 300, 10, 8};
    c.key_dtype = kt;
    c.query_dtype = DType::f64;
    c.fill = fill_normal;
    c.values = true;
    out.push_back(c);
  }
  Case few{"too_few_selectable", 2, 64, 8, 60};
  few.fill = fill_normal;
  few.excluded = 20;
  few.expect_short = true;
  out.push_back(few);
  Case masked = few;
  masked.name = "too_few_allowed";
  masked.excluded = 0;
  masked.allow_frac = 0.5;
  masked.k = 40;
  out.push_back(masked);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  Level levels[reco::cpu::kMaxLevels];
  const int n = reco::cpu::available_levels(levels, reco::cpu::kMaxLevels);
  std::vector<Level> run;
  if (argc == 2 && std::string(argv[1]) == "--levels") {
    for (int i = 0; i < n; ++i) std::printf("%s\n", reco::cpu::level_name(levels[i]));
    return 0;
  }
  if (argc == 2 && std::string(argv[1]) == "--list") {
    for (const Case& c : cases()) std::printf("%s\n", c.name.c_str());
    return 0;
  }
  for (int a = 1; a < argc; ++a) {
    bool found = false;
    for (int i = 0; i < n; ++i)
      if (argv[a] == std::string(reco::cpu::level_name(levels[i]))) {
        run.push_back(levels[i]);
        found = true;
      }
    if (!found) {
      std::printf("FAIL: level %s is not available here\n", argv[a]);
      return 1;
    }
  }
  if (run.empty()) run.assign(levels, levels + n);
  const std::vector<Case> all = cases();
  std::vector<int> passed(run.size(), 0);
  for (size_t i = 0; i < all.size(); ++i) {
    const std::vector<std::string> what = run_case(all[i], run, 1000u + static_cast<unsigned>(i));
    for (size_t l = 0; l < run.size(); ++l) {
      if (what[l].empty())
        ++passed[l];
      else
        std::printf("FAIL %s %s: %s\n", reco::cpu::level_name(run[l]), all[i].name.c_str(),
                    what[l].c_str());
    }
  }
  int failures = 0;
  for (size_t l = 0; l < run.size(); ++l) {
    failures += static_cast<int>(all.size()) - passed[l];
    if (passed[l] == static_cast<int>(all.size()))
      std::printf("ok %s %d\n", reco::cpu::level_name(run[l]), passed[l]);
  }
  return failures == 0 ? 0 : 1;
}
