// Device helpers shared by the CUDA search and merge kernels (included by .cu files only).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "reco/order.h"

namespace reco::cuda {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("reco CUDA: ") + what + ": " + cudaGetErrorString(e));
}

// The current device's shared memory per block with the opt-in.
inline int device_optin_smem() {
  int device = 0, optin = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "cudaDeviceGetAttribute");
  return optin;
}

// Lets `kernel` take, beside its static shared memory (cudaFuncGetAttributes), all the dynamic
// shared memory the current device allows (a launch still asks for what it needs). Done before
// every launch, whatever its size: the 48 KB default counts static and dynamic bytes together,
// and the value is the same on every call, so host threads launching at once never lower it
// under each other.
template <typename K>
void allow_dynamic_smem(K* kernel) {
  cudaFuncAttributes attr{};
  check(cudaFuncGetAttributes(&attr, kernel), "cudaFuncGetAttributes");
  const int dynamic = device_optin_smem() - int(attr.sharedSizeBytes);
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic),
        "cudaFuncSetAttribute");
}

// Makes `device` current for its scope, then restores the caller's device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

__device__ __forceinline__ float load(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load(const __half* p) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}
__device__ __forceinline__ float load(const __nv_bfloat16* p) {
  return __bfloat162float(__ushort_as_bfloat16(__ldg(reinterpret_cast<const unsigned short*>(p))));
}

// The selection order (reco/order.h); empty slots are rows < 0.
using reco::ranks_before;

template <typename S, typename R>
__device__ __forceinline__ void order_pair(S* s, R* r, int i, int j, bool best_first) {
  const bool swap =
      best_first ? ranks_before(s[j], r[j], s[i], r[i]) : ranks_before(s[i], r[i], s[j], r[j]);
  if (swap) {
    const S ts = s[i];
    s[i] = s[j];
    s[j] = ts;
    const R tr = r[i];
    r[i] = r[j];
    r[j] = tr;
  }
}

// Sorts n (a power of two) entries of shared memory best first; every thread of the block calls.
template <typename S, typename R>
__device__ void bitonic_sort(S* s, R* r, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) order_pair(s, r, i, j, (i & size) == 0);
      }
      __syncthreads();
    }
  }
}

// The same sort by one warp (every lane of the warp calls; other warps sort other lists).
template <typename S, typename R>
__device__ void warp_bitonic_sort(S* s, R* r, int n) {
  const int lane = threadIdx.x & 31;
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = lane; i < n; i += 32) {
        const int j = i ^ stride;
        if (j > i) order_pair(s, r, i, j, (i & size) == 0);
      }
      __syncwarp();
    }
  }
}

__device__ __forceinline__ bool excluded(const int64_t* __restrict__ ex, int64_t E, int64_t r) {
  for (int64_t i = 0; i < E; ++i)
    if (__ldg(ex + i) == r) return true;
  return false;
}

// Whether query row ex (its exclude list, or null) may select key row r under the allow mask
// (or null); tested only for a score that would enter the query's list.
__device__ __forceinline__ bool selectable(const int64_t* __restrict__ ex, int64_t E,
                                           const uint8_t* __restrict__ allow, int64_t r) {
  return (allow == nullptr || __ldg(allow + r) != 0) && (ex == nullptr || !excluded(ex, E, r));
}

// The tensor-core search (search_mma.cu): for keys of a 16-bit float type or int8 and the query
// as terms of that type, writes each split's top-k (k <= mma::kMaxK) to the workspace, as the
// CUDA-core search does (scores in the terms' scale; for int8, dot * the row's scale).
struct SearchArgs {
  const void* query;  // [terms, B, d] contiguous, of the keys' type
  int terms;          // 1 or 2 (float16 keys), 1 or 3 (bfloat16 keys), 1 (int8 codes)
  int64_t B, d;
  const void* keys;  // [N, d], row stride key_stride (elements)
  int64_t N, key_stride;
  bool int8;                // keys and query are int8 codes
  const float* key_scales;  // [N] for int8, else null
  const int64_t* exclude;   // [B, E] or null
  const uint8_t* allow;     // [N] (0 = never select) or null
  int64_t E, k, rows_per_split;
  float* part_scores;  // [B, S, k]
  int64_t* part_rows;
  int S;
  cudaStream_t stream;
};
void search_mma(const SearchArgs& a, bool bf16);
// Shared memory (dynamic + static) of the tensor-core search with `stages` pipeline stages, and
// the most stages (3 or 2; 0: none) that fit a GPU allowing optin_smem bytes per block.
size_t search_mma_smem(int terms, int stages);
int search_mma_stages(int terms, int optin_smem);

}  // namespace reco::cuda
