// The tensor-core search: keys of a 16-bit float type or int8, accumulation in fp32 (int32 for
// int8) with mma.sync (m16n8k16 for 16-bit floats, m16n8k32 for int8; sm_80 and later). The
// query arrives as kTerms terms of the keys' type whose sum is the query (one term: a query of
// the keys' type, or int8 codes; more: a float32 query split by the caller, scaled per row by a
// power of two), so every product is exact and a score is the sum over the terms. int8 scores
// are the exact integer dot product times the row's scale (the coarse score of
// fused_retrieve_attend_int8; the merge kernel re-ranks its candidates exactly).
//
// Both types are addressed in 16-bit units (an int8 pair is one unit): a 16-bit k16 step is an
// int8 k32 step, and the two instructions' fragments match unit for unit, so one tile layout
// (mma_layout.h) serves both.
//
// A block takes 64 queries and one split of the rows, and walks the split in tiles of 256 rows.
// Query-term and key chunks of 32 units of d stream through a 3-stage cp.async pipeline (2 stages
// where 3 exceed the GPU's shared memory: 3 bfloat16 terms on an A100; 16-byte copies; rows past
// the split and units past d are zero-filled). Each of the 8 warps keeps a
// 32 x 64 tile of scores in registers; when a tile is complete, each score that beats its
// query's current k-th best is staged in shared memory, one n8 tile at a time, and a query whose
// staging area could overflow on the next step has it merged into its running top list (a warp
// bitonic sort). The score matrix never leaves the chip. Rows are kept as int32 offsets from the
// split's first row (so N may exceed 2^31); each split writes its top-k to the workspace.
#include <cmath>

#include "common.cuh"
#include "mma_layout.h"
#include "ptx.cuh"

namespace reco::cuda {
namespace {

using namespace mma;
using namespace ptx;

// The instruction for each key type: its accumulator, one mma on a 16 x 8 tile of one k step
// (16 16-bit units), and the score of an accumulator of a row whose scale is `scale`.
template <bool kBf16>
struct Float16Mma {
  using Acc = float;
  static constexpr bool kScaled = false;
  static __device__ __forceinline__ void mma(Acc (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    if constexpr (kBf16)
      mma_bf16(c, a, b0, b1);
    else
      mma_f16(c, a, b0, b1);
  }
  static __device__ __forceinline__ float score(Acc c, float) { return c; }
};
using F16 = Float16Mma<false>;
using BF16 = Float16Mma<true>;
struct S8 {
  using Acc = int;
  static constexpr bool kScaled = true;
  static __device__ __forceinline__ void mma(Acc (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    mma_s8(c, a, b0, b1);
  }
  // float32(dot) * scale in float32, as reference.coarse_scores computes it.
  static __device__ __forceinline__ float score(Acc c, float scale) {
    return __fmul_rn(__int2float_rn(c), scale);
  }
};

constexpr size_t stage_elems(int terms) { return size_t(terms * kQueries + kRows) * kPitch; }
constexpr size_t smem_bytes(int terms, int stages) {
  return stages * stage_elems(terms) * 2 + size_t(kQueries) * kEntries * 8;
}
constexpr size_t kStaticSmem = 3 * kQueries * 4;  // the kernel's thr_s, thr_r and count

// d and key_stride in 16-bit units; key_scales: the rows' scales (int8 keys) or null.
template <typename Op, int kTerms, int kStages>
__global__ void __launch_bounds__(kThreads, 1)
    search_mma_kernel(const uint16_t* __restrict__ query, int64_t B, int64_t d,
                      const uint16_t* __restrict__ keys, int64_t N, int64_t key_stride,
                      const float* __restrict__ key_scales, const int64_t* __restrict__ exclude,
                      const uint8_t* __restrict__ allow, int64_t E, int64_t k, int64_t rows_per_split, float* __restrict__ part_scores,
                      int64_t* __restrict__ part_rows, int S) {
  using T = uint16_t;
  using Acc = typename Op::Acc;
  RECO_DYNAMIC_SHARED(smem);
  constexpr size_t kStageElems = stage_elems(kTerms);
  // [kStages][query tiles kTerms x kQueries, key tile kRows][kPitch]
  T* tiles = reinterpret_cast<T*>(smem);
  float* cs = reinterpret_cast<float*>(tiles + kStages * kStageElems);  // [kQueries][kEntries]
  int* cr = reinterpret_cast<int*>(cs + kQueries * kEntries);           // row offsets, -1 = empty
  RECO_SHARED(float[kQueries], thr_s);  // each query's current k-th best: the entry to beat
  RECO_SHARED(int[kQueries], thr_r);
  RECO_SHARED(int[kQueries], count);  // staged candidates

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wq = warp / kWarpsN, wn = warp % kWarpsN;
  const int64_t q0 = int64_t(blockIdx.x) * kQueries;
  const int nq = int(min(int64_t(kQueries), B - q0));
  const int split = blockIdx.y;
  const int64_t n0 = int64_t(split) * rows_per_split;
  const int64_t n1 = min(N, n0 + rows_per_split);
  const int chunks = int((d + kChunk - 1) / kChunk);
  const int64_t steps = n1 > n0 ? (n1 - n0 + kRows - 1) / kRows * chunks : 0;

  for (int i = tid; i < kQueries * kEntries; i += kThreads) {
    cs[i] = -INFINITY;
    cr[i] = -1;
  }
  if (tid < kQueries) {
    thr_s[tid] = -INFINITY;
    thr_r[tid] = -1;
    count[tid] = 0;
  }

  // Issues the copies of pipeline step it (tile it / chunks, chunk it % chunks).
  auto load = [&](int64_t it) {
    T* qt = tiles + (it % kStages) * kStageElems;
    const int64_t col0 = (it % chunks) * kChunk;
    const int64_t r0 = n0 + (it / chunks) * kRows;
    constexpr int kSegs = kChunk / 8;  // 16-byte segments per row
    for (int i = tid; i < (kTerms * kQueries + kRows) * kSegs; i += kThreads) {
      const int row = i / kSegs, seg = i % kSegs;
      const int64_t col = col0 + seg * 8;
      const T* src;
      bool in;
      if (row < kTerms * kQueries) {  // term row / kQueries of query q0 + row % kQueries
        const int64_t q = q0 + row % kQueries;
        in = q < B && col < d;
        src = query + ((row / kQueries) * B + q) * d + col;
      } else {
        const int64_t r = r0 + row - kTerms * kQueries;
        in = r < n1 && col < d;
        src = keys + r * key_stride + col;
      }
      // d is a multiple of 8, so a segment is wholly inside or outside the row.
      cp_async16(qt + row * kPitch + seg * 8, in ? src : keys, in ? 16 : 0);
    }
  };

  // Merges each staged query's candidates into its list; warp w takes queries w, w + 8, ...
  auto merge = [&]() {
    for (int q = warp; q < kQueries; q += kThreads / 32) {
      const int c = count[q];
      if (c == 0) continue;
      float* s = cs + q * kEntries;
      int* r = cr + q * kEntries;
      for (int i = kList + c + lane; i < kEntries; i += 32) {
        s[i] = -INFINITY;
        r[i] = -1;
      }
      __syncwarp();
      warp_bitonic_sort(s, r, kEntries);
      if (lane == 0) {
        thr_s[q] = s[k - 1];
        thr_r[q] = r[k - 1];
        count[q] = 0;
      }
      __syncwarp();
    }
  };

  Acc acc[kMT][kNT][4];
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load(s);
    cp_async_commit();
  }
  for (int64_t it = 0; it < steps; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // step it has landed for every thread; step it - 1's stage is free
    if (it + kStages - 1 < steps) load(it + kStages - 1);
    cp_async_commit();

    const int chunk = int(it % chunks);
    if (chunk == 0) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[mt][nt][i] = Acc(0);
    }
    const T* qt = tiles + (it % kStages) * kStageElems;
    const T* kt = qt + kTerms * kQueries * kPitch;
#pragma unroll
    for (int ks = 0; ks < kChunk / 16; ++ks) {
      uint32_t b[kNT / 2][4];
#pragma unroll
      for (int p = 0; p < kNT / 2; ++p) ldmatrix_x4(b[p], kt + b_offset(wn, p, ks, lane));
#pragma unroll
      for (int t = 0; t < kTerms; ++t) {  // the key fragments serve every term
        uint32_t a[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
          ldmatrix_x4(a[mt], qt + t * kQueries * kPitch + a_offset(wq, mt, ks, lane));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
            Op::mma(acc[mt][nt], a[mt], b[nt / 2][(nt & 1) * 2], b[nt / 2][(nt & 1) * 2 + 1]);
      }
    }
    if (chunk != chunks - 1) continue;

    // The tile's scores are complete: stage those that beat their query's k-th best.
    const int64_t tile0 = (it / chunks) * kRows;  // offset of the tile's first row in the split
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      bool full = false;
      float scale[2] = {1.f, 1.f};  // of this lane's two rows of the n8 tile
      if constexpr (Op::kScaled) {
        for (int i = 0; i < 2; ++i) {
          const int64_t r = n0 + tile0 + c_row(wn, nt, lane, i);
          scale[i] = r < n1 ? __ldg(key_scales + r) : 0.f;
        }
      }
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int q = c_query(wq, mt, lane, i);
          const int off = int(tile0) + c_row(wn, nt, lane, i);
          const float sc = Op::score(acc[mt][nt][i], scale[i & 1]);
          if (q < nq && n0 + off < n1 && ranks_before(sc, off, thr_s[q], thr_r[q]) &&
              selectable(exclude == nullptr ? nullptr : exclude + (q0 + q) * E, E, allow,
                         n0 + off)) {
            const int pos = atomicAdd(&count[q], 1);
            cs[q * kEntries + kList + pos] = sc;
            cr[q * kEntries + kList + pos] = off;
            full |= pos + 1 > kStaging - kPerStep;
          }
        }
      if (__syncthreads_or(full)) {
        merge();
        __syncthreads();
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  merge();
  __syncthreads();

  for (int i = tid; i < nq * k; i += kThreads) {
    const int q = int(i / k), j = int(i % k);
    const size_t o = (size_t(q0 + q) * S + split) * k + j;
    const int off = cr[q * kEntries + j];
    part_scores[o] = cs[q * kEntries + j];
    part_rows[o] = off < 0 ? -1 : n0 + off;
  }
}

template <typename Op, int kTerms, int kStages>
void launch_stages(const SearchArgs& a) {
  constexpr size_t smem = smem_bytes(kTerms, kStages);
  allow_dynamic_smem(search_mma_kernel<Op, kTerms, kStages>);
  const int64_t qblocks = (a.B + kQueries - 1) / kQueries;
  const int64_t unit = a.int8 ? 2 : 1;  // elements per 16-bit unit
  ptx::launch(search_mma_kernel<Op, kTerms, kStages>, dim3(unsigned(qblocks), unsigned(a.S)),
              kThreads, smem, a.stream, static_cast<const uint16_t*>(a.query), a.B, a.d / unit,
              static_cast<const uint16_t*>(a.keys), a.N, a.key_stride / unit, a.key_scales,
              a.exclude, a.allow, a.E, a.k, a.rows_per_split, a.part_scores, a.part_rows, a.S);
  check(cudaGetLastError(), "tensor-core search kernel launch");
}

template <typename Op, int kTerms>
void launch(const SearchArgs& a) {
  const int stages = search_mma_stages(kTerms, device_optin_smem());
  if (stages == kMaxStages) return launch_stages<Op, kTerms, kMaxStages>(a);
  if (stages == 2) return launch_stages<Op, kTerms, 2>(a);
  throw std::invalid_argument("reco CUDA: the tensor-core search does not fit this GPU's shared "
                              "memory");
}

}  // namespace

size_t search_mma_smem(int terms, int stages) { return smem_bytes(terms, stages) + kStaticSmem; }

int search_mma_stages(int terms, int optin_smem) {
  for (int stages = kMaxStages; stages >= 2; --stages)
    if (search_mma_smem(terms, stages) <= size_t(optin_smem)) return stages;
  return 0;
}

void search_mma(const SearchArgs& a, bool bf16) {
  if (a.int8 && a.terms == 1) return launch<S8, 1>(a);
  if (!a.int8 && !bf16 && a.terms == 1) return launch<F16, 1>(a);
  if (!a.int8 && !bf16 && a.terms == 2) return launch<F16, 2>(a);
  if (!a.int8 && bf16 && a.terms == 1) return launch<BF16, 1>(a);
  if (!a.int8 && bf16 && a.terms == 3) return launch<BF16, 3>(a);
  throw std::invalid_argument("reco CUDA: no tensor-core search for these query terms");
}

}  // namespace reco::cuda
