// Tests of the CUDA emulation shim (csrc/emulation): every primitive against an independent
// reference on random data, and the misuse the shim must report. Kernels are written as CUDA.
// Usage: emulation_check [--list | case...]; prints "ok: <n> cases" or FAIL lines, exits non-zero
// on a failure.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/ptx.cuh"

using reco::cuda::ptx::launch;

namespace {

std::mt19937 rng(20240611u);
int rand_int(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }
float rand_float() { return std::uniform_real_distribution<float>(-1.f, 1.f)(rng); }

struct Failure {
  std::string what;
};
#define EXPECT(cond, ...)                                  \
  do {                                                     \
    if (!(cond)) {                                         \
      char buf_[512];                                      \
      std::snprintf(buf_, sizeof buf_, __VA_ARGS__);       \
      throw Failure{std::string(#cond ": ") + buf_};       \
    }                                                      \
  } while (0)

void expect_ok(cudaError_t e, const char* what) {
  EXPECT(e == cudaSuccess, "%s: %s", what, cudaGetErrorString(e));
}
// A launch that must fail with `code` and a report containing `text`.
void expect_error(cudaError_t e, cudaError_t code, const char* text) {
  EXPECT(e == code, "got %s (%s), want %s", cudaGetErrorName(e), reco::emu::last_report(),
         cudaGetErrorName(code));
  EXPECT(std::strstr(reco::emu::last_report(), text) != nullptr, "report \"%s\" lacks \"%s\"",
         reco::emu::last_report(), text);
}
template <typename... P, typename... A>
cudaError_t run(void (*k)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  launch(k, grid, block, smem, nullptr, std::forward<A>(args)...);
  return cudaGetLastError();
}

// ---- shuffles and votes -------------------------------------------------------------------------
__global__ void shuffle_kernel(const int* in, const double* din, int* out, double* dout,
                               const int* ops, int nops) {
  const int t = threadIdx.x;
  const int v = in[t];
  for (int i = 0; i < nops; ++i) {
    const int mode = ops[3 * i], arg = ops[3 * i + 1], width = ops[3 * i + 2];
    int r = 0;
    switch (mode) {
      case 0: r = __shfl_sync(0xffffffffu, v, arg, width); break;
      case 1: r = __shfl_up_sync(0xffffffffu, v, unsigned(arg), width); break;
      case 2: r = __shfl_down_sync(0xffffffffu, v, unsigned(arg), width); break;
      default: r = __shfl_xor_sync(0xffffffffu, v, arg, width); break;
    }
    out[i * blockDim.x + t] = r;
  }
  dout[t] = __shfl_xor_sync(0xffffffffu, din[t], 5);  // an 8-byte value
}

// The CUDA Programming Guide's description of each shuffle, lane by lane.
int shuffle_reference(const std::vector<int>& v, int t, int mode, int arg, int width) {
  const int warp0 = t / 32 * 32, lane = t % 32, seg = lane / width * width;
  switch (mode) {
    case 0: return v[size_t(warp0 + seg + arg % width)];
    case 1: return lane - seg >= arg ? v[size_t(t - arg)] : v[size_t(t)];
    case 2: return lane - seg + arg < width ? v[size_t(t + arg)] : v[size_t(t)];
    default: {
      const int j = lane ^ arg;  // later segments are out of reach: the lane keeps its value
      return j < seg + width ? v[size_t(warp0 + j)] : v[size_t(t)];
    }
  }
}

void test_shuffles() {
  const int n = 64;
  std::vector<int> in(n), ops;
  std::vector<double> din(n), dout(n);
  for (auto& x : in) x = rand_int(-1000000, 1000000);
  for (auto& x : din) x = rand_float() * 1e300;
  for (int width : {32, 16, 8, 4, 2, 1})
    for (int rep = 0; rep < 3; ++rep) {
      ops.insert(ops.end(), {0, rand_int(0, 63), width});
      ops.insert(ops.end(), {1, rand_int(0, width), width});
      ops.insert(ops.end(), {2, rand_int(0, width), width});
      ops.insert(ops.end(), {3, rand_int(0, 31), width});
    }
  const int nops = int(ops.size() / 3);
  std::vector<int> out(size_t(nops) * n, 0);
  expect_ok(run(shuffle_kernel, 1, n, 0, in.data(), din.data(), out.data(), dout.data(), ops.data(),
                nops),
            "shuffle launch");
  for (int i = 0; i < nops; ++i)
    for (int t = 0; t < n; ++t) {
      const int want = shuffle_reference(in, t, ops[3 * i], ops[3 * i + 1], ops[3 * i + 2]);
      EXPECT(out[size_t(i * n + t)] == want, "op %d (mode %d arg %d width %d) thread %d: %d != %d",
             i, ops[3 * i], ops[3 * i + 1], ops[3 * i + 2], t, out[size_t(i * n + t)], want);
    }
  for (int t = 0; t < n; ++t)
    EXPECT(dout[size_t(t)] == din[size_t(t ^ 5)], "double shuffle at %d", t);
}

// Votes over the full warp, and over two halves that diverge and vote with disjoint masks.
__global__ void vote_kernel(const int* pred, unsigned* out) {
  const int t = threadIdx.x, lane = t % 32;
  const int p = pred[t];
  out[4 * t] = __ballot_sync(0xffffffffu, p);
  out[4 * t + 1] = unsigned(__any_sync(0xffffffffu, p));
  out[4 * t + 2] = unsigned(__all_sync(0xffffffffu, p));
  if (lane < 16)
    out[4 * t + 3] = __ballot_sync(0x0000ffffu, p);
  else
    out[4 * t + 3] = __ballot_sync(0xffff0000u, !p);
}

void test_votes() {
  const int n = 96;
  for (int rep = 0; rep < 4; ++rep) {
    std::vector<int> pred(n);
    for (auto& p : pred) p = rep == 3 ? 1 : rand_int(0, 3) > 0;  // rep 3: all true
    std::vector<unsigned> out(4 * n);
    expect_ok(run(vote_kernel, 1, n, 0, pred.data(), out.data()), "vote launch");
    for (int t = 0; t < n; ++t) {
      const int w = t / 32 * 32;
      unsigned ballot = 0, half = 0;
      for (int l = 0; l < 32; ++l) {
        if (pred[size_t(w + l)]) ballot |= 1u << l;
        const bool mine_half = (l < 16) == (t % 32 < 16);
        if (mine_half && (l < 16 ? pred[size_t(w + l)] : !pred[size_t(w + l)])) half |= 1u << l;
      }
      EXPECT(out[size_t(4 * t)] == ballot, "ballot at %d", t);
      EXPECT(out[size_t(4 * t + 1)] == (ballot != 0), "any at %d", t);
      EXPECT(out[size_t(4 * t + 2)] == (ballot == ~0u), "all at %d", t);
      EXPECT(out[size_t(4 * t + 3)] == half, "divergent ballot at %d: %08x != %08x", t,
             out[size_t(4 * t + 3)], half);
    }
  }
}

// ---- a block reduction and the project's bitonic sorts ------------------------------------------
__global__ void reduce_kernel(const int* in, int n, long long* out) {
  RECO_DYNAMIC_SHARED(smem);
  long long* part = reinterpret_cast<long long*>(smem);  // one per warp
  long long s = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += in[i];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x < 32) {
    const int warps = int(blockDim.x / 32);
    long long v = int(threadIdx.x) < warps ? part[threadIdx.x] : 0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) out[blockIdx.x] = v;
  }
}

void test_block_reduction() {
  for (int threads : {32, 256, 1024}) {
    const int n = rand_int(1000, 5000);
    std::vector<int> in(static_cast<size_t>(n));
    long long want = 0;
    for (auto& x : in) want += x = rand_int(-(1 << 30), 1 << 30);
    long long got[2] = {0, 0};
    expect_ok(run(reduce_kernel, 2, threads, size_t(threads / 32) * 8, in.data(), n, got),
              "reduction launch");
    EXPECT(got[0] == want && got[1] == want, "%d threads: %lld, %lld != %lld", threads, got[0],
           got[1], want);
  }
}

__global__ void sort_kernel(const float* s_in, const int* r_in, int n, float* s_out, int* r_out,
                            int per_warp) {
  RECO_DYNAMIC_SHARED(smem);
  float* s = reinterpret_cast<float*>(smem);
  int* r = reinterpret_cast<int*>(s + n);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    s[i] = s_in[i];
    r[i] = r_in[i];
  }
  __syncthreads();
  if (per_warp == 0) {
    reco::cuda::bitonic_sort(s, r, n);
  } else {  // each warp sorts its own list of per_warp entries
    const int w = threadIdx.x / 32;
    reco::cuda::warp_bitonic_sort(s + w * per_warp, r + w * per_warp, per_warp);
    __syncthreads();
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    s_out[i] = s[i];
    r_out[i] = r[i];
  }
}

bool before(float sa, int ra, float sb, int rb) {  // the selection order, written independently
  if (ra < 0 || rb < 0) return rb < 0 && ra >= 0;
  if (std::isnan(sa) || std::isnan(sb)) return std::isnan(sb) && (!std::isnan(sa) || ra < rb);
  return sa > sb || (sa == sb && ra < rb);
}

void check_sorted(std::vector<std::pair<float, int>> want, const float* s, const int* r,
                  const char* what) {
  std::sort(want.begin(), want.end(), [](auto& a, auto& b) {
    return before(a.first, a.second, b.first, b.second);
  });
  for (size_t i = 0; i < want.size(); ++i) {
    // Empty slots (row < 0) come last in any order of their scores.
    const bool same = want[i].second < 0
                          ? r[i] < 0
                          : r[i] == want[i].second && (std::isnan(s[i]) ? std::isnan(want[i].first)
                                                                        : s[i] == want[i].first);
    EXPECT(same, "%s: entry %zu is (%g, %d), want (%g, %d)", what, i, double(s[i]), r[i],
           double(want[i].first), want[i].second);
  }
}

void test_bitonic_sorts() {
  for (int per_warp : {0, 64}) {
    const int threads = 128, n = per_warp ? 4 * per_warp : 512;
    std::vector<float> s(static_cast<size_t>(n)), so(static_cast<size_t>(n));
    std::vector<int> r(static_cast<size_t>(n)), ro(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      s[size_t(i)] = float(rand_int(-20, 20)) / 4;  // many ties
      r[size_t(i)] = i;
      if (rand_int(0, 15) == 0) s[size_t(i)] = NAN;
      if (rand_int(0, 15) == 0) r[size_t(i)] = -1;  // empty slots
    }
    std::shuffle(r.begin(), r.end(), rng);
    expect_ok(run(sort_kernel, 1, threads, size_t(n) * 8, s.data(), r.data(), n, so.data(),
                  ro.data(), per_warp),
              "sort launch");
    const int lists = per_warp ? n / per_warp : 1, len = per_warp ? per_warp : n;
    for (int l = 0; l < lists; ++l) {
      std::vector<std::pair<float, int>> want;
      for (int i = l * len; i < (l + 1) * len; ++i) want.push_back({s[size_t(i)], r[size_t(i)]});
      check_sorted(want, so.data() + l * len, ro.data() + l * len,
                   per_warp ? "warp_bitonic_sort" : "bitonic_sort");
    }
  }
}

// ---- ldmatrix and mma ---------------------------------------------------------------------------
// Copies a 32 x 16 matrix of 16-bit elements (row pitch 24) into shared memory, and each lane's
// ldmatrix.xN(.trans) registers out: lane l gives the address of row l % (8N) (columns 0-7 of
// rows 0-31 for l < 32: matrix m is rows 8m..8m+7).
template <int N, bool kTrans>
__global__ void ldmatrix_kernel(const uint16_t* in, uint32_t* out) {
  RECO_DYNAMIC_SHARED(smem);
  uint16_t* tile = reinterpret_cast<uint16_t*>(smem);
  for (int i = threadIdx.x; i < 32 * 24; i += 32) tile[i] = in[i];
  __syncwarp();
  const int lane = threadIdx.x;
  uint32_t r[4] = {0, 0, 0, 0};
  const uint16_t* row = tile + (lane % (8 * N)) * 24 + (lane / (8 * N)) % 2 * 8;
  reco::emu::ldmatrix(N, kTrans, r, row, {__FILE__, __LINE__});
  for (int m = 0; m < 4; ++m) out[lane * 4 + m] = r[m];
}

template <int N, bool kTrans>
void check_ldmatrix() {
  std::vector<uint16_t> in(32 * 24);
  for (auto& x : in) x = uint16_t(rand_int(0, 65535));
  std::vector<uint32_t> out(128, 0);
  expect_ok(run(ldmatrix_kernel<N, kTrans>, 1, 32, 32 * 24 * 2, in.data(), out.data()),
            "ldmatrix launch");
  for (int lane = 0; lane < 32; ++lane)
    for (int m = 0; m < N; ++m) {
      // PTX ISA: row r of matrix m is at the address of lane 8m + r, here row 8m + r of the tile.
      const int g = lane / 4, t = lane % 4;
      auto at = [&](int r, int c) { return uint32_t(in[size_t((8 * m + r) * 24 + c)]); };
      const uint32_t want = kTrans ? at(2 * t, g) | at(2 * t + 1, g) << 16
                                   : at(g, 2 * t) | at(g, 2 * t + 1) << 16;
      EXPECT(out[size_t(lane * 4 + m)] == want, "x%d%s lane %d matrix %d: %08x != %08x", N,
             kTrans ? ".trans" : "", lane, m, out[size_t(lane * 4 + m)], want);
    }
}

void test_ldmatrix() {
  check_ldmatrix<1, false>();
  check_ldmatrix<2, false>();
  check_ldmatrix<4, false>();
  check_ldmatrix<1, true>();
  check_ldmatrix<2, true>();
  check_ldmatrix<4, true>();
}

// D = A B + C for one m16n8 tile: A (16 x K) and the keys (8 x K, = B column-major) row-major in
// shared memory, loaded with ldmatrix as the tensor-core search does, D written from the
// accumulator layout. K = 16 16-bit units (16 halves or 32 int8).
template <int kType>  // 0 f16, 1 bf16, 2 s8
__global__ void mma_kernel(const uint16_t* a, const uint16_t* b, const uint32_t* c, uint32_t* d) {
  RECO_DYNAMIC_SHARED(smem);
  uint16_t* as = reinterpret_cast<uint16_t*>(smem);  // [16][24]
  uint16_t* bs = as + 16 * 24;                       // [8][24]
  const int lane = threadIdx.x;
  for (int i = lane; i < 16 * 16; i += 32) as[i / 16 * 24 + i % 16] = a[i];
  for (int i = lane; i < 8 * 16; i += 32) bs[i / 16 * 24 + i % 16] = b[i];
  __syncwarp();
  uint32_t ar[4], br[4];
  // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
  reco::cuda::ptx::ldmatrix_x4(ar, as + (lane % 16) * 24 + lane / 16 * 8);
  // B: matrices (k 0-7), (k 8-15) of the 8 key rows; lanes 16-31 repeat them.
  reco::cuda::ptx::ldmatrix_x4(br, bs + (lane % 8) * 24 + (lane / 8) % 2 * 8);
  const int g = lane / 4, t = lane % 4;
  if constexpr (kType == 2) {
    int acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = int(c[(g + i / 2 * 8) * 8 + 2 * t + i % 2]);
    reco::cuda::ptx::mma_s8(acc, ar, br[0], br[1]);
    for (int i = 0; i < 4; ++i) d[(g + i / 2 * 8) * 8 + 2 * t + i % 2] = uint32_t(acc[i]);
  } else {
    float acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = __uint_as_float(c[(g + i / 2 * 8) * 8 + 2 * t + i % 2]);
    if constexpr (kType == 0)
      reco::cuda::ptx::mma_f16(acc, ar, br[0], br[1]);
    else
      reco::cuda::ptx::mma_bf16(acc, ar, br[0], br[1]);
    for (int i = 0; i < 4; ++i) d[(g + i / 2 * 8) * 8 + 2 * t + i % 2] = __float_as_uint(acc[i]);
  }
}

template <int kType>
void check_mma() {
  for (int rep = 0; rep < 8; ++rep) {
    std::vector<uint16_t> a(256), b(128);
    std::vector<uint32_t> c(128), d(128, 0);
    std::vector<double> A(16 * 32), B(8 * 32);  // as numbers: [row][k] (k up to 32 for int8)
    for (int i = 0; i < 256; ++i) {
      if (kType == 2) {
        const int lo = rand_int(-128, 127), hi = rand_int(-128, 127);
        a[size_t(i)] = uint16_t(uint8_t(lo) | uint8_t(hi) << 8);
        A[size_t(i / 16 * 32 + i % 16 * 2)] = lo;
        A[size_t(i / 16 * 32 + i % 16 * 2 + 1)] = hi;
      } else {
        const float x = rand_float() * std::ldexp(1.f, rand_int(-6, 6));
        a[size_t(i)] = kType == 0 ? __half_as_ushort(__float2half(x))
                                  : __bfloat16_as_ushort(__float2bfloat16(x));
        A[size_t(i / 16 * 32 + i % 16)] =
            kType == 0 ? __half2float(__ushort_as_half(a[size_t(i)]))
                       : __bfloat162float(__ushort_as_bfloat16(a[size_t(i)]));
      }
    }
    for (int i = 0; i < 128; ++i) {
      if (kType == 2) {
        const int lo = rand_int(-128, 127), hi = rand_int(-128, 127);
        b[size_t(i)] = uint16_t(uint8_t(lo) | uint8_t(hi) << 8);
        B[size_t(i / 16 * 32 + i % 16 * 2)] = lo;
        B[size_t(i / 16 * 32 + i % 16 * 2 + 1)] = hi;
      } else {
        const float x = rand_float() * std::ldexp(1.f, rand_int(-6, 6));
        b[size_t(i)] = kType == 0 ? __half_as_ushort(__float2half(x))
                                  : __bfloat16_as_ushort(__float2bfloat16(x));
        B[size_t(i / 16 * 32 + i % 16)] =
            kType == 0 ? __half2float(__ushort_as_half(b[size_t(i)]))
                       : __bfloat162float(__ushort_as_bfloat16(b[size_t(i)]));
      }
    }
    for (auto& x : c)
      x = kType == 2 ? uint32_t(rand_int(-100000, 100000)) : __float_as_uint(rand_float() * 8);
    expect_ok(run(mma_kernel<kType>, 1, 32, 24 * 24 * 2, a.data(), b.data(), c.data(), d.data()),
              "mma launch");
    const int K = kType == 2 ? 32 : 16;
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 8; ++j) {
        double want = kType == 2 ? double(int(c[size_t(i * 8 + j)]))
                                 : double(__uint_as_float(c[size_t(i * 8 + j)]));
        double mag = std::fabs(want);
        for (int k = 0; k < K; ++k) {
          want += A[size_t(i * 32 + k)] * B[size_t(j * 32 + k)];
          mag += std::fabs(A[size_t(i * 32 + k)] * B[size_t(j * 32 + k)]);
        }
        const double got = kType == 2 ? double(int(d[size_t(i * 8 + j)]))
                                      : double(__uint_as_float(d[size_t(i * 8 + j)]));
        const double tol = kType == 2 ? 0 : mag * 0x1p-23;
        EXPECT(std::fabs(got - want) <= tol, "type %d D[%d][%d] = %.9g, want %.9g", kType, i, j,
               got, want);
      }
  }
}

void test_mma() {
  check_mma<0>();
  check_mma<1>();
  check_mma<2>();
}

// ---- cp.async -----------------------------------------------------------------------------------
// Each thread copies 16-byte segments with src-size sizes[i] (zero-filling the rest) in three
// commit groups, waits for the two older ones first, then for all, and copies shared out.
__global__ void cp_async_kernel(const unsigned char* src, const int* sizes, int segs,
                                unsigned char* out) {
  RECO_DYNAMIC_SHARED(smem);
  const int per_group = segs / 3;
  for (int grp = 0; grp < 3; ++grp) {
    for (int i = grp * per_group + int(threadIdx.x); i < (grp + 1) * per_group; i += blockDim.x)
      reco::cuda::ptx::cp_async16(smem + 16 * i, src + 16 * i, sizes[i]);
    reco::cuda::ptx::cp_async_commit();
  }
  reco::cuda::ptx::cp_async_wait<1>();
  __syncthreads();
  for (int i = threadIdx.x; i < 2 * per_group * 16; i += blockDim.x) out[i] = smem[i];
  reco::cuda::ptx::cp_async_wait<0>();
  __syncthreads();
  for (int i = 2 * per_group * 16 + int(threadIdx.x); i < 3 * per_group * 16; i += blockDim.x)
    out[i] = smem[i];
}

void test_cp_async() {
  const int segs = 3 * 40;
  std::vector<unsigned char> src(size_t(segs) * 16), out(size_t(segs) * 16, 0x55);
  std::vector<int> sizes(static_cast<size_t>(segs));
  for (auto& x : src) x = uint8_t(rand_int(1, 255));
  for (auto& x : sizes) x = rand_int(0, 16);
  alignas(16) static unsigned char aligned_src[3 * 40 * 16];
  std::memcpy(aligned_src, src.data(), src.size());
  expect_ok(run(cp_async_kernel, 1, 64, size_t(segs) * 16, aligned_src, sizes.data(), segs,
                out.data()),
            "cp.async launch");
  for (int i = 0; i < segs * 16; ++i) {
    const unsigned char want = i % 16 < sizes[size_t(i / 16)] ? src[size_t(i)] : 0;
    EXPECT(out[size_t(i)] == want, "byte %d: %d != %d", i, out[size_t(i)], want);
  }
}

// ---- launch rules and the runtime ---------------------------------------------------------------
__global__ void touch_kernel(int bytes, int* out) {
  RECO_DYNAMIC_SHARED(smem);
  RECO_SHARED(int[4], small);
  if (threadIdx.x == 0) {
    small[0] = bytes;
    smem[bytes - 1] = 7;
    out[0] = smem[bytes - 1] + small[0];
  }
}

void test_device_attributes() {
  struct {
    const char* name;
    int optin, sms, major;
  } archs[] = {{"sm_80", 166912, 108, 8}, {"sm_90", 232448, 132, 9}};
  for (auto& a : archs) {
    EXPECT(reco::emu::set_arch(a.name), "%s", a.name);
    int v = 0;
    expect_ok(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0), "optin");
    EXPECT(v == a.optin, "%s opt-in %d", a.name, v);
    expect_ok(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, 0), "sms");
    EXPECT(v == a.sms, "%s SMs %d", a.name, v);
    expect_ok(cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, 0), "major");
    EXPECT(v == a.major, "%s major %d", a.name, v);
    int d = -1, n = 0;
    expect_ok(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
    EXPECT(n == 2, "%d devices", n);
    expect_ok(cudaGetDevice(&d), "cudaGetDevice");
    EXPECT(d == 0, "device %d", d);
    expect_ok(cudaSetDevice(1), "cudaSetDevice(1)");
    expect_ok(cudaGetDevice(&d), "cudaGetDevice");
    EXPECT(d == 1, "device %d after cudaSetDevice(1)", d);
    expect_ok(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, 1), "sms of device 1");
    EXPECT(v == a.sms, "%s SMs %d on device 1", a.name, v);
    expect_ok(cudaSetDevice(0), "cudaSetDevice(0)");
    EXPECT(cudaSetDevice(2) == cudaErrorInvalidDevice, "device 2 of 2");
    EXPECT(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, 2) == cudaErrorInvalidDevice,
           "attribute of device 2 of 2");
    cudaGetLastError();
  }
  EXPECT(!reco::emu::set_arch("sm_75"), "an unknown architecture");
}

void test_launch_limits() {
  int out = 0;
  // Within the default 48 KB (with the 16 static bytes): runs everywhere.
  for (const char* a : {"sm_80", "sm_90"}) {
    reco::emu::set_arch(a);
    expect_ok(run(touch_kernel, 1, 32, 48 * 1024 - 16, 48 * 1024 - 16, &out), "48 KB launch");
    EXPECT(out == 7 + 48 * 1024 - 16, "%d", out);
  }
  // Over 48 KB without the opt-in fails on both.
  for (const char* a : {"sm_80", "sm_90"}) {
    reco::emu::set_arch(a);
    expect_error(run(touch_kernel, 1, 32, 48 * 1024, 48 * 1024, &out), cudaErrorInvalidValue,
                 "dynamic shared memory");
  }
  // 200 KB with the opt-in: over A100's 166,912 bytes, within H100's 232,448.
  const int big = 200 * 1024;
  reco::emu::set_arch("sm_80");
  EXPECT(cudaFuncSetAttribute(touch_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, big) ==
             cudaErrorInvalidValue,
         "opt-in past the sm_80 limit");
  cudaGetLastError();
  expect_error(run(touch_kernel, 1, 32, size_t(big), big, &out), cudaErrorInvalidValue,
               "sm_80");
  reco::emu::set_arch("sm_90");
  expect_ok(cudaFuncSetAttribute(touch_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, big),
            "sm_90 opt-in");
  expect_ok(run(touch_kernel, 1, 32, size_t(big), big, &out), "200 KB launch on sm_90");
  EXPECT(out == 7 + big, "%d", out);
  cudaFuncAttributes attr;
  expect_ok(cudaFuncGetAttributes(&attr, touch_kernel), "attributes");
  EXPECT(attr.sharedSizeBytes == 16, "static shared %zu", attr.sharedSizeBytes);
  // The static bytes count: the largest opt-in is the limit minus them.
  EXPECT(cudaFuncSetAttribute(touch_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              232448 - 15) == cudaErrorInvalidValue,
         "static + dynamic past the limit");
  cudaGetLastError();
  // Threads and registers per block.
  expect_error(run(touch_kernel, 1, 1025, 64, 64, &out), cudaErrorInvalidConfiguration, "1024");
  expect_error(run(touch_kernel, dim3(1, 70000), 32, 64, 64, &out), cudaErrorInvalidConfiguration,
               "grid");
  reco::emu::set_kernel_info(reinterpret_cast<const void*>(touch_kernel), 128);
  expect_error(run(touch_kernel, 1, 1024, 64, 64, &out), cudaErrorLaunchOutOfResources,
               "registers");
  expect_ok(run(touch_kernel, 1, 512, 64, 64, &out), "512 threads x 128 registers");
  reco::emu::set_kernel_info(reinterpret_cast<const void*>(touch_kernel), 0);
}

// ---- what the shim must report ------------------------------------------------------------------
__global__ void race_kernel(int mode, int* out) {
  RECO_DYNAMIC_SHARED(smem);
  int* s = reinterpret_cast<int*>(smem);
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = -1;
  __syncthreads();
  s[t] = t;
  if (mode == 0) __syncthreads();  // correct: the barrier orders the writes before the reads
  if (mode == 2) __syncwarp();     // orders the warp's lanes only
  const int partner = mode == 2 ? (t ^ 1) : (t + 33) % n;
  out[t] = s[partner];
}

void test_race_is_reported() {
  std::vector<int> out(64);
  expect_ok(run(race_kernel, 1, 64, 256, 0, out.data()), "with the barrier");
  for (int t = 0; t < 64; ++t) EXPECT(out[size_t(t)] == (t + 33) % 64, "%d", t);
  expect_ok(run(race_kernel, 1, 64, 256, 2, out.data()), "within a warp after __syncwarp");
  expect_error(run(race_kernel, 1, 64, 256, 1, out.data()), cudaErrorLaunchFailure,
               "shared memory race");
  EXPECT(std::strstr(reco::emu::last_report(), "emulation_check") != nullptr,
         "names the code: %s", reco::emu::last_report());
}

__global__ void war_kernel(int* out) {
  RECO_DYNAMIC_SHARED(smem);
  int* s = reinterpret_cast<int*>(smem);
  s[threadIdx.x] = 1;
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];  // lane 31 reads warp 1's word...
  s[threadIdx.x] = 2;                                   // ...which warp 1 then overwrites
}

void test_write_after_read_is_reported() {
  std::vector<int> out(64);
  expect_error(run(war_kernel, 1, 64, 256, out.data()), cudaErrorLaunchFailure,
               "race (write after read)");
}

__global__ void oob_kernel(int index, int* out) {
  RECO_DYNAMIC_SHARED(smem);
  float* s = reinterpret_cast<float*>(smem);
  s[threadIdx.x] = 1.f;
  __syncthreads();
  if (threadIdx.x == 3) s[index] = 2.f;
  out[threadIdx.x] = 1;
}

void test_out_of_bounds_is_reported() {
  std::vector<int> out(32);
  expect_ok(run(oob_kernel, 1, 32, 256, 63, out.data()), "the last float");
  expect_error(run(oob_kernel, 1, 32, 256, 64, out.data()), cudaErrorIllegalAddress,
               "out-of-bounds shared write of 4 bytes at byte 256 of the 256-byte dynamic");
  expect_error(run(oob_kernel, 1, 32, 256, -2, out.data()), cudaErrorIllegalAddress,
               "out-of-bounds");
}

__global__ void uninit_kernel(int* out) {
  RECO_SHARED(int[64], s);
  if (threadIdx.x < 16) s[threadIdx.x] = 1;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

void test_uninitialised_read_is_reported() {
  std::vector<int> out(32);
  expect_error(run(uninit_kernel, 1, 32, 0, out.data()), cudaErrorLaunchFailure,
               "uninitialised");
}

__global__ void cp_async_wait_kernel(const uint4* src, int wait, uint4* out) {
  RECO_DYNAMIC_SHARED(smem);
  reco::cuda::ptx::cp_async16(smem + 16 * threadIdx.x, src + threadIdx.x, 16);
  reco::cuda::ptx::cp_async_commit();
  if (wait) reco::cuda::ptx::cp_async_wait<0>();
  __syncthreads();
  out[threadIdx.x] = reinterpret_cast<const uint4*>(smem)[(threadIdx.x + 1) % blockDim.x];
}

void test_missing_cp_async_wait_is_reported() {
  std::vector<uint4> src(32), out(32);
  for (auto& v : src) v = uint4{unsigned(rand_int(0, 1 << 30)), 1, 2, 3};
  expect_ok(run(cp_async_wait_kernel, 1, 32, 512, src.data(), 1, out.data()), "with the wait");
  for (int t = 0; t < 32; ++t) EXPECT(out[size_t(t)].x == src[size_t((t + 1) % 32)].x, "%d", t);
  expect_error(run(cp_async_wait_kernel, 1, 32, 512, src.data(), 0, out.data()),
               cudaErrorLaunchFailure, "cp.async of thread");
}

__global__ void partial_shuffle_kernel(int mode, int* out) {
  const int lane = threadIdx.x % 32;
  int v = lane;
  if (lane < 16) v = __shfl_sync(0xffffffffu, v, 0);  // lanes 16-31 never reach it
  if (mode == 1) __syncwarp();
  out[threadIdx.x] = v;
}

void test_partial_shuffle_is_reported() {
  std::vector<int> out(32);
  expect_error(run(partial_shuffle_kernel, 1, 32, 0, 0, out.data()), cudaErrorLaunchFailure,
               "exited without reaching __shfl_sync");
  expect_error(run(partial_shuffle_kernel, 1, 32, 0, 1, out.data()), cudaErrorLaunchFailure,
               "only part of its mask");
  EXPECT(std::strstr(reco::emu::last_report(), "emulation_check.cpp:") != nullptr,
         "names the call site: %s", reco::emu::last_report());
}

__global__ void divergent_barrier_kernel(int mode, int* out) {
  if (mode == 0) {
    if (threadIdx.x < 32) __syncthreads();  // the second warp skips it and exits
  } else {
    if (threadIdx.x < 32)
      __syncthreads();
    else
      __syncthreads();  // a different barrier
  }
  out[threadIdx.x] = 1;
}

void test_deadlock_is_reported() {
  std::vector<int> out(64);
  expect_error(run(divergent_barrier_kernel, 1, 64, 0, 0, out.data()), cudaErrorLaunchFailure,
               "deadlock");
  expect_error(run(divergent_barrier_kernel, 1, 64, 0, 1, out.data()), cudaErrorLaunchFailure,
               "divergent barrier");
}

// The two halves of each warp diverge and exchange values through shared memory, each ordered
// by its own __syncwarp: collectives with disjoint masks, and their memory ordering.
__global__ void half_warp_kernel(const int* in, int* out) {
  RECO_SHARED(int[64], s);
  const int t = threadIdx.x, lane = t % 32;
  s[t] = in[t];
  if (lane < 16) {
    __syncwarp(0x0000ffffu);
    out[t] = s[t ^ 7];
  } else {
    __syncwarp(0xffff0000u);
    out[t] = s[t ^ 5] + __shfl_sync(0xffff0000u, s[t], 16);
  }
}

void test_half_warps() {
  std::vector<int> in(64), out(64);
  for (auto& x : in) x = rand_int(-1000, 1000);
  expect_ok(run(half_warp_kernel, 1, 64, 0, in.data(), out.data()), "half warps");
  for (int t = 0; t < 64; ++t) {
    const int want = t % 32 < 16 ? in[size_t(t ^ 7)] : in[size_t(t ^ 5)] + in[size_t(t / 32 * 32 + 16)];
    EXPECT(out[size_t(t)] == want, "thread %d: %d != %d", t, out[size_t(t)], want);
  }
}

struct Case {
  const char* name;
  void (*fn)();
};
const Case kCases[] = {
    {"shuffles", test_shuffles},
    {"votes", test_votes},
    {"block_reduction", test_block_reduction},
    {"bitonic_sorts", test_bitonic_sorts},
    {"ldmatrix", test_ldmatrix},
    {"mma", test_mma},
    {"cp_async", test_cp_async},
    {"device_attributes", test_device_attributes},
    {"launch_limits", test_launch_limits},
    {"race", test_race_is_reported},
    {"write_after_read", test_write_after_read_is_reported},
    {"out_of_bounds", test_out_of_bounds_is_reported},
    {"uninitialised", test_uninitialised_read_is_reported},
    {"missing_cp_async_wait", test_missing_cp_async_wait_is_reported},
    {"partial_shuffle", test_partial_shuffle_is_reported},
    {"deadlock", test_deadlock_is_reported},
    {"half_warps", test_half_warps},
};

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "--list") == 0) {
    for (const Case& c : kCases) std::printf("%s\n", c.name);
    return 0;
  }
  int ran = 0, failed = 0;
  for (const Case& c : kCases) {
    bool wanted = argc == 1;
    for (int i = 1; i < argc; ++i) wanted |= std::strcmp(argv[i], c.name) == 0;
    if (!wanted) continue;
    reco::emu::set_arch("sm_90");
    ++ran;
    try {
      c.fn();
    } catch (const Failure& f) {
      ++failed;
      std::printf("FAIL %s: %s\n", c.name, f.what.c_str());
    }
  }
  if (ran == 0) {
    std::printf("FAIL: no such case\n");
    return 2;
  }
  if (failed) return 1;
  std::printf("ok: %d cases\n", ran);
  return 0;
}
