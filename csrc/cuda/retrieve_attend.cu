// The CUDA fused retrieve-attend: a search kernel, then a merge + attention kernel.
//
// Kernel 1 (search): for 16-bit keys, the tensor-core search of search_mma.cu, given the query
// as 16-bit terms (the query itself when it has the keys' type; a float32 query split in two or
// three terms when more than 8 queries make the search compute-bound). Otherwise (float32 keys,
// k > 64, unaligned rows, a few float32 queries) the CUDA-core search below, exact in fp32: a
// thread block takes up to 8 queries (copied to shared memory as float32) and one split of the
// rows. Each warp scores rows (lanes take 16-byte segments of the row where rows are 16-byte
// aligned, single elements otherwise; fp32 accumulation, warp reduction), and a candidate that
// beats its query's current k-th best is appended to a staging area in shared memory. Before the
// staging area can overflow, the block merges it into the running top list with a bitonic sort
// (best first: higher score, then lower row; NaN below every number; empty slots last). The
// B x N score matrix never leaves the chip; each split writes its top-k to a workspace.
// Kernel 2 (merge + attend): one block per query merges the splits' lists, re-scores the
// candidates (k; more for the int8 search) in float64 against the keys and re-sorts them, keeps
// the k best, then computes the softmax and the weighted sum of values
// in float64 (as the CPU kernel does) and writes float32 results. Argument errors that depend on
// the data (an exclude row out of range, k above a query's allowed, not excluded rows) cannot raise
// without a host synchronisation: that query gets index -1 and NaN scores, weights and output.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common.cuh"
#include "mma_layout.h"
#include "ptx.cuh"
#include "retrieve_attend.h"

namespace reco::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = kWarps * 32;  // rows a block scores between two merges (32 per warp)
constexpr int kMaxQueries = 8;

// The 16 / sizeof(T) elements of 16 bytes of keys, as floats.
template <typename T>
__device__ __forceinline__ void unpack(uint4 u, float* f);
template <>
__device__ __forceinline__ void unpack<float>(uint4 u, float* f) {
  f[0] = __uint_as_float(u.x);
  f[1] = __uint_as_float(u.y);
  f[2] = __uint_as_float(u.z);
  f[3] = __uint_as_float(u.w);
}
template <>
__device__ __forceinline__ void unpack<__half>(uint4 u, float* f) {
  const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
    f[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}
template <>
__device__ __forceinline__ void unpack<__nv_bfloat16>(uint4 u, float* f) {
  const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // a bfloat16 is the top half of a float32
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

template <typename TK>
__global__ void __launch_bounds__(kThreads, 2)
    search_kernel(const float* __restrict__ query, int64_t B, int64_t d,
                  const TK* __restrict__ keys, int64_t N, int64_t key_stride,
                  const int64_t* __restrict__ exclude, const uint8_t* __restrict__ allow,
                  int64_t E, int64_t k, int P, int QB,
                  int64_t rows_per_split, float* __restrict__ part_scores,
                  int64_t* __restrict__ part_rows, int S, bool vec) {
  RECO_DYNAMIC_SHARED(smem);
  int64_t* rows = reinterpret_cast<int64_t*>(smem);                  // [QB][2P]
  float* scs = reinterpret_cast<float*>(rows + size_t(QB) * 2 * P);  // [QB][2P]
  float* qs = scs + size_t(QB) * 2 * P;                              // [QB][d] the queries
  int* count = reinterpret_cast<int*>(qs + size_t(QB) * d);          // [QB] staged candidates
  RECO_SHARED(float[kMaxQueries], thr_s);  // each query's current k-th best (the entry to beat)
  RECO_SHARED(int64_t[kMaxQueries], thr_r);

  const int64_t q0 = int64_t(blockIdx.x) * QB;
  const int nq = int(min(int64_t(QB), B - q0));
  const int split = blockIdx.y;
  const int64_t n0 = int64_t(split) * rows_per_split;
  const int64_t n1 = min(N, n0 + rows_per_split);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  for (int i = threadIdx.x; i < QB * 2 * P; i += blockDim.x) {
    rows[i] = -1;
    scs[i] = -INFINITY;
  }
  for (int64_t i = threadIdx.x; i < QB * d; i += blockDim.x)
    qs[i] = i < nq * d ? query[q0 * d + i] : 0.f;
  if (int(threadIdx.x) < QB) {
    count[threadIdx.x] = 0;
    thr_s[threadIdx.x] = -INFINITY;
    thr_r[threadIdx.x] = -1;
  }
  __syncthreads();

  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    for (int i = 0; i < 32; ++i) {
      const int64_t r = t0 + warp * 32 + i;
      if (r >= n1) break;  // the same for every lane of the warp
      float acc[kMaxQueries];
#pragma unroll
      for (int q = 0; q < kMaxQueries; ++q) acc[q] = 0.f;
      const TK* kr = keys + r * key_stride;
      if (vec) {  // 16-byte loads: each lane takes V consecutive elements, the warp 32 V
        constexpr int V = 16 / sizeof(TK);
#pragma unroll 2
        for (int64_t j = lane * V; j < d; j += 32 * V) {
          float kv[V];
          unpack<TK>(__ldg(reinterpret_cast<const uint4*>(kr + j)), kv);
#pragma unroll
          for (int q = 0; q < kMaxQueries; ++q)
            if (q < nq) {
              const float4* qv = reinterpret_cast<const float4*>(qs + q * d + j);
#pragma unroll
              for (int v = 0; v < V / 4; ++v) {
                const float4 x = qv[v];
                acc[q] = fmaf(x.x, kv[4 * v], acc[q]);
                acc[q] = fmaf(x.y, kv[4 * v + 1], acc[q]);
                acc[q] = fmaf(x.z, kv[4 * v + 2], acc[q]);
                acc[q] = fmaf(x.w, kv[4 * v + 3], acc[q]);
              }
            }
        }
      } else {
        for (int64_t j = lane; j < d; j += 32) {
          const float kv = load(kr + j);
#pragma unroll
          for (int q = 0; q < kMaxQueries; ++q)
            if (q < nq) acc[q] = fmaf(qs[q * d + j], kv, acc[q]);
        }
      }
      float mine = 0.f;  // lane q keeps query q's score (no dynamic register indexing)
#pragma unroll
      for (int q = 0; q < kMaxQueries; ++q) {
        if (q >= nq) break;  // the same for the whole block
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[q] += __shfl_xor_sync(0xffffffffu, acc[q], o);
        if (lane == q) mine = acc[q];
      }
      if (lane < nq && ranks_before(mine, r, thr_s[lane], thr_r[lane]) &&
          selectable(exclude == nullptr ? nullptr : exclude + (q0 + lane) * E, E, allow, r)) {
        const int pos = atomicAdd(&count[lane], 1);
        scs[size_t(lane) * 2 * P + P + pos] = mine;
        rows[size_t(lane) * 2 * P + P + pos] = r;
      }
    }
    __syncthreads();
    const bool last = t0 + kTile >= n1;
    for (int q = 0; q < nq; ++q) {
      const int c = count[q];
      if (!last && c <= P - kTile) continue;  // room for one more tile: merge later
      __syncthreads();
      const size_t base = size_t(q) * 2 * P;
      for (int i = threadIdx.x; i < P - c; i += blockDim.x) {
        rows[base + P + c + i] = -1;
        scs[base + P + c + i] = -INFINITY;
      }
      __syncthreads();
      bitonic_sort(scs + base, rows + base, 2 * P);
      if (threadIdx.x == 0) {
        count[q] = 0;
        thr_s[q] = scs[base + k - 1];
        thr_r[q] = rows[base + k - 1];
      }
      __syncthreads();
    }
    // Every thread has read the counts before any appends to them in the next tile (without
    // this, threads could disagree on which queries to merge, and diverge at the barriers).
    __syncthreads();
  }

  for (int q = 0; q < nq; ++q)
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      const size_t o = (size_t(q0 + q) * S + split) * k + j;
      part_scores[o] = scs[size_t(q) * 2 * P + j];
      part_rows[o] = rows[size_t(q) * 2 * P + j];
    }
}

template <typename TK, typename TV>
__global__ void __launch_bounds__(kThreads, 1)
    merge_attend_kernel(const float* __restrict__ query, int64_t d, const TK* __restrict__ keys,
                        int64_t key_stride, const TV* __restrict__ values, int64_t dv,
                        int64_t value_stride, const float* __restrict__ attn_query, int H,
                        const int64_t* __restrict__ exclude, int64_t E, int64_t N,
                        const float* __restrict__ part_scores,
                        const int64_t* __restrict__ part_rows, int S, int64_t kc, int64_t k, int P,
                        double inv_t, float* __restrict__ output, float* __restrict__ weights,
                        int64_t* __restrict__ indices, float* __restrict__ scores) {
  RECO_DYNAMIC_SHARED(smem);
  int64_t* rows = reinterpret_cast<int64_t*>(smem);       // [2P]
  double* dsc = reinterpret_cast<double*>(rows + 2 * P);  // [P] float64 scores of winners
  double* w = dsc + P;                                    // [P] logits, then weights
  float* scs = reinterpret_cast<float*>(w + P);           // [2P]
  RECO_SHARED(int, bad);  // this query's data-dependent arguments are invalid
  const int64_t b = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  if (threadIdx.x == 0) bad = 0;
  for (int i = threadIdx.x; i < 2 * P; i += blockDim.x) {
    rows[i] = -1;
    scs[i] = -INFINITY;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < E; i += blockDim.x) {
    const int64_t e = exclude[b * E + i];
    if (e < -1 || e >= N) atomicOr(&bad, 1);
  }
  const int64_t total = int64_t(S) * kc;
  const float* ps = part_scores + b * total;
  const int64_t* pr = part_rows + b * total;
  for (int64_t c0 = 0; c0 < total; c0 += P) {
    for (int i = threadIdx.x; i < P; i += blockDim.x) {
      const bool in = c0 + i < total;
      scs[P + i] = in ? ps[c0 + i] : -INFINITY;
      rows[P + i] = in ? pr[c0 + i] : -1;
    }
    __syncthreads();
    bitonic_sort(scs, rows, 2 * P);
  }

  // Re-score the winners in float64 (one warp per row) and re-sort them.
  const float* q = query + b * d;
  for (int64_t j = warp; j < P; j += kWarps) {
    double acc = 0.0;
    const int64_t r = j < kc ? rows[j] : -1;
    if (r >= 0) {
      const TK* kr = keys + r * key_stride;
      for (int64_t c = lane; c < d; c += 32) acc += double(__ldg(q + c)) * double(load(kr + c));
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    }
    if (lane == 0) {
      dsc[j] = r >= 0 ? acc : -INFINITY;
      if (j >= kc) rows[j] = -1;
    }
  }
  __syncthreads();
  bitonic_sort(dsc, rows, P);
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x)
    if (rows[j] < 0) atomicOr(&bad, 1);  // fewer than k rows were left to select
  __syncthreads();
  if (bad) {
    // Raising would need a host synchronisation: the query's results are made unmistakable.
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      indices[b * k + j] = -1;
      scores[b * k + j] = NAN;
    }
    if (output == nullptr) return;
    for (int64_t i = threadIdx.x; i < int64_t(H) * k; i += blockDim.x) weights[b * H * k + i] = NAN;
    for (int64_t i = threadIdx.x; i < int64_t(H) * dv; i += blockDim.x)
      output[b * H * dv + i] = NAN;
    return;
  }
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
    indices[b * k + j] = rows[j];
    scores[b * k + j] = float(dsc[j]);
  }
  if (output == nullptr) return;  // the search alone: no values, no attention

  for (int h = 0; h < H; ++h) {
    // Logits: the scores, or the attention query against each retrieved value.
    if (attn_query == nullptr) {
      for (int64_t j = threadIdx.x; j < k; j += blockDim.x) w[j] = dsc[j] * inv_t;
    } else {
      const float* a = attn_query + (b * H + h) * dv;
      for (int64_t j = warp; j < k; j += kWarps) {
        const TV* vr = values + rows[j] * value_stride;
        double acc = 0.0;
        for (int64_t c = lane; c < dv; c += 32) acc += double(__ldg(a + c)) * double(load(vr + c));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) w[j] = acc * inv_t;
      }
    }
    __syncthreads();
    if (warp == 0) {  // softmax; a NaN logit makes every weight NaN, as torch.softmax does
      double m = -INFINITY;
      bool nan = false;
      for (int64_t j = lane; j < k; j += 32) {
        nan |= isnan(w[j]);
        m = fmax(m, w[j]);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, o));
      nan = __any_sync(0xffffffffu, nan);
      double sum = 0.0;
      for (int64_t j = lane; j < k; j += 32) {
        w[j] = exp(w[j] - m);
        sum += w[j];
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      for (int64_t j = lane; j < k; j += 32) w[j] = nan ? NAN : w[j] / sum;
    }
    __syncthreads();
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x)
      weights[(b * H + h) * k + j] = float(w[j]);
    for (int64_t c = threadIdx.x; c < dv; c += blockDim.x) {
      double acc = 0.0;
      for (int64_t j = 0; j < k; ++j)
        acc += w[j] * double(load(values + rows[j] * value_stride + c));
      output[(b * H + h) * dv + c] = float(acc);
    }
    __syncthreads();
  }
}

int pow2_at_least(int64_t k) {
  int64_t p = kTile;
  while (p < k) p <<= 1;
  return int(p);
}

size_t search_smem(int queries, int P, int64_t d) {
  return size_t(queries) * 2 * P * (sizeof(int64_t) + sizeof(float)) +
         size_t(queries) * d * sizeof(float) + queries * sizeof(int);
}

size_t merge_smem(int P) {
  return size_t(2) * P * sizeof(int64_t) + size_t(2) * P * sizeof(double) +
         size_t(2) * P * sizeof(float);
}

template <typename TK, typename TV>
void merge(const Args& a) {
  const int64_t B = a.query.shape[0], d = a.query.shape[1], N = a.keys.shape[0];
  const int64_t E = a.exclude.present() ? a.exclude.shape[1] : 0;
  const int H = a.attn_query.present() ? int(a.attn_query.shape[1]) : 1;
  const bool attend = a.values.present();  // absent: the search alone
  const size_t smem = merge_smem(a.plan.pow2);
  allow_dynamic_smem(merge_attend_kernel<TK, TV>);
  ptx::launch(merge_attend_kernel<TK, TV>, unsigned(B), kThreads, smem,
              reinterpret_cast<cudaStream_t>(a.stream), a.query.ptr<float>(), d, a.keys.ptr<TK>(),
              a.keys.strides[0], attend ? a.values.ptr<TV>() : nullptr,
              attend ? a.values.shape[1] : 0, attend ? a.values.strides[0] : 0,
              a.attn_query.present() ? a.attn_query.ptr<float>() : nullptr, H,
              E > 0 ? a.exclude.ptr<int64_t>() : nullptr, E, N, a.part_scores.ptr<float>(),
              a.part_rows.ptr<int64_t>(), a.plan.splits, a.candidates, a.k, a.plan.pow2,
              1.0 / a.temperature, attend ? a.output.ptr<float>() : nullptr,
              attend ? a.weights.ptr<float>() : nullptr, a.indices.ptr<int64_t>(),
              a.scores.ptr<float>());
  check(cudaGetLastError(), "merge kernel launch");
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The tensor-core search applies: query terms of the keys' type, 16-byte aligned rows.
bool use_mma(const Args& a) {
  return a.plan.mma && a.query_terms.present() && a.query_terms.dtype == a.keys.dtype &&
         a.query.shape[1] % 8 == 0 && aligned(a.query_terms.data) && aligned(a.keys.data) &&
         a.keys.strides[0] % 8 == 0;
}

// The int8 search applies: int8 query codes and key codes, rows of whole 16-byte segments.
bool use_int8(const Args& a) {
  return a.plan.mma && a.query_terms.present() && a.query_terms.dtype == DType::i8 &&
         a.codes.dtype == DType::i8 && a.key_scales.dtype == DType::f32 &&
         a.query.shape[1] % 16 == 0 && aligned(a.query_terms.data) && aligned(a.codes.data) &&
         a.codes.strides[0] % 16 == 0;
}

template <typename TK, typename TV>
void launch(const Args& a) {
  const auto st = reinterpret_cast<cudaStream_t>(a.stream);
  const int64_t B = a.query.shape[0], d = a.query.shape[1], N = a.keys.shape[0];
  const Plan& p = a.plan;
  const int64_t rows_per_split = (N + p.splits - 1) / p.splits;
  const int64_t E = a.exclude.present() ? a.exclude.shape[1] : 0;
  const int64_t* exclude = E > 0 ? a.exclude.ptr<int64_t>() : nullptr;
  const uint8_t* allow = a.allow.present() ? a.allow.ptr<uint8_t>() : nullptr;
  float* ps = a.part_scores.ptr<float>();
  int64_t* pr = a.part_rows.ptr<int64_t>();
  if (a.codes.present()) {  // coarse int8 search; the merge re-ranks the candidates exactly
    if (!use_int8(a))
      throw std::invalid_argument(
          "reco CUDA: the int8 search needs int8 query codes and key codes, d a multiple of 16 "
          "and 16-byte aligned rows");
    search_mma(
        {a.query_terms.data, 1, B, d, a.codes.data, N, a.codes.strides[0], true,
         a.key_scales.ptr<float>(), exclude, allow, E, a.candidates, rows_per_split, ps, pr, p.splits, st},
        false);
    return merge<TK, TV>(a);
  }
  if constexpr (sizeof(TK) == 2) {
    if (use_mma(a)) {
      search_mma(
          {a.query_terms.data, int(a.query_terms.shape[0]), B, d, a.keys.data, N, a.keys.strides[0],
           false, nullptr, exclude, allow, E, a.candidates, rows_per_split, ps, pr, p.splits, st},
          std::is_same_v<TK, __nv_bfloat16>);
      return merge<TK, TV>(a);
    }
  }
  const int64_t qblocks = (B + p.queries - 1) / p.queries;
  const size_t s1 = search_smem(p.queries, p.pow2, d);
  constexpr int V = 16 / sizeof(TK);  // elements per 16-byte load
  const bool vec = aligned(a.keys.data) && a.keys.strides[0] % V == 0 && d % V == 0;
  allow_dynamic_smem(search_kernel<TK>);
  ptx::launch(search_kernel<TK>, dim3(unsigned(qblocks), unsigned(p.splits)), kThreads, s1, st,
              a.query.ptr<float>(), B, d, a.keys.ptr<TK>(), N, a.keys.strides[0], exclude, allow, E,
              a.candidates, p.pow2, p.queries, rows_per_split, ps, pr, p.splits, vec);
  check(cudaGetLastError(), "search kernel launch");
  merge<TK, TV>(a);
}

template <typename TK>
void launch_values(const Args& a) {
  if (!a.values.present()) return launch<TK, float>(a);  // the search alone
  switch (a.values.dtype) {
    case DType::f32: return launch<TK, float>(a);
    case DType::f16: return launch<TK, __half>(a);
    case DType::bf16: return launch<TK, __nv_bfloat16>(a);
    default: throw std::invalid_argument("reco CUDA: values must be float32, float16 or bfloat16");
  }
}

}  // namespace

Plan plan(int64_t batch, int64_t rows, int64_t dim, int64_t k, int terms, int device) {
  if (k < 1 || k > kMaxCandidates)
    throw std::invalid_argument("reco CUDA: k (or candidates) = " + std::to_string(k) +
                                " must be in [1, " + std::to_string(kMaxCandidates) + "]");
  Plan p;
  int optin = 0, sms = 0;  // the device is named, never made current
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute");
  p.pow2 = pow2_at_least(k);
  const size_t budget = size_t(optin) - 1024;  // static shared memory and slack
  int queries = kMaxQueries;
  while (queries > 0 && search_smem(queries, p.pow2, dim) > budget) --queries;
  if (queries == 0 || merge_smem(p.pow2) > budget) return p;
  p.queries = int(std::max<int64_t>(1, std::min<int64_t>(queries, batch)));
  // A float32 query on few rows of queries is memory-bound: exact on CUDA cores, no split.
  p.mma = terms > 0 && dim % 8 == 0 && k <= mma::kMaxK && search_mma_stages(terms, optin) > 0 &&
          (terms == 1 || batch > kMaxQueries);
  // Splits along N: each of at least 4 tiles and fewer than 2^30 rows (the tensor-core search
  // keeps int32 row offsets); enough to fill the GPU, the number whose last wave of blocks leaves
  // the fewest SMs idle (the tensor-core search runs one block per SM, the CUDA-core one ~4).
  const int64_t per_block = p.mma ? mma::kQueries : p.queries;
  const int64_t tile = p.mma ? mma::kRows : kTile;
  const int64_t slots = int64_t(sms) * (p.mma ? 1 : 4);  // blocks resident at once
  const int64_t qblocks = (batch + per_block - 1) / per_block;
  const int64_t most = std::min<int64_t>(65535, std::max<int64_t>(1, rows / (4 * tile)));
  const int64_t least = std::min(most, std::max<int64_t>(1, slots / qblocks));
  int64_t best = least;
  double best_use = 0;
  for (int64_t s = least; s <= std::min(most, 8 * least); ++s) {
    const int64_t blocks = qblocks * s;
    const double use = double(blocks) / double((blocks + slots - 1) / slots * slots);
    if (use > best_use + 1e-9) {
      best = s;
      best_use = use;
    }
  }
  p.splits = int(std::max<int64_t>(best, (rows >> 30) + 1));
  p.ok = true;
  return p;
}

void check_plan(const Args& a) {
  const Plan& p = a.plan;
  const int64_t B = a.query.shape[0], N = a.keys.shape[0];
  auto fail = [](const std::string& what) {
    throw std::invalid_argument("reco CUDA: the plan does not match the call: " + what);
  };
  if (a.k < 1 || a.k > a.candidates || a.candidates > N || a.candidates > kMaxCandidates)
    fail("need 1 <= k <= candidates <= min(N, " + std::to_string(kMaxCandidates) + "), got k=" +
         std::to_string(a.k) + ", candidates=" + std::to_string(a.candidates));
  if (p.splits < 1 || p.splits > 65535) fail("splits must be in [1, 65535]");
  if (p.queries < 1 || p.queries > kMaxQueries) fail("queries must be in [1, 8]");
  if (p.pow2 < kTile || (p.pow2 & (p.pow2 - 1)) != 0 || p.pow2 < a.candidates)
    fail("pow2 must be a power of two >= 256 and >= candidates, got " + std::to_string(p.pow2));
  if (p.mma && a.candidates > mma::kMaxK)
    fail("the tensor-core search keeps at most 64 candidates");
  if (a.codes.present() && !p.mma) fail("the int8 search needs mma");
  for (const TensorView* v : {&a.part_scores, &a.part_rows})
    if (v->ndim != 3 || v->shape[0] != B || v->shape[1] != p.splits ||
        v->shape[2] != a.candidates || v->strides[2] != 1 || v->strides[1] != a.candidates ||
        v->strides[0] != p.splits * a.candidates)
      fail("the workspace must be contiguous [B, splits, candidates]");
  if (a.part_scores.dtype != DType::f32 || a.part_rows.dtype != DType::i64)
    fail("the workspace must be float32 scores and int64 rows");
  const int optin = device_optin_smem();
  if (merge_smem(p.pow2) > size_t(optin) - 1024 ||
      search_smem(p.queries, p.pow2, a.query.shape[1]) > size_t(optin) - 1024)
    fail("pow2 and queries need more shared memory than this GPU has");
}

void retrieve_attend(const Args& a) {
  // This runtime (linked statically) is told the device itself rather than trusting the caller's;
  // the caller's current device is restored.
  DeviceGuard guard(a.query.device_id);
  check_plan(a);
  switch (a.keys.dtype) {
    case DType::f32: return launch_values<float>(a);
    case DType::f16: return launch_values<__half>(a);
    case DType::bf16: return launch_values<__nv_bfloat16>(a);
    default: throw std::invalid_argument("reco CUDA: keys must be float32, float16 or bfloat16");
  }
}

}  // namespace reco::cuda
