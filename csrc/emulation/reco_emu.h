// A CPU emulation of the CUDA subset csrc/cuda uses, for tests on machines without a GPU.
//
// The same .cu sources are compiled by the host C++ compiler (as C++17, with -DRECO_EMULATION,
// this folder first on the include path, and -fsanitize=thread, whose access hooks this shim
// defines instead of linking the ThreadSanitizer runtime: every load and store of the kernels
// reaches the shim, which checks those that fall in shared memory). Each CUDA thread runs as a
// fiber, one block at a time; barriers, warp collectives and the PTX instructions of
// csrc/cuda/ptx.cuh are implemented here with their documented semantics, and misuse is an
// error of the launch (see README.md beside this file).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef RECO_EMULATION
#error "reco_emu.h is the emulation build's CUDA: compile with -DRECO_EMULATION"
#endif

// ---- qualifiers -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// ---- vector and index types ---------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(8) float2 {
  float x, y;
};
constexpr int warpSize = 32;

// ---- runtime API --------------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorInvalidDevice = 101,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMaxRegistersPerBlock = 12,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
struct cudaFuncAttributes {
  size_t sharedSizeBytes;  // static shared memory
  size_t constSizeBytes, localSizeBytes;
  int maxThreadsPerBlock, numRegs, ptxVersion, binaryVersion, cacheModeCA;
  int maxDynamicSharedSizeBytes;
};

const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t = {});
cudaError_t cudaMemset(void* p, int v, size_t n);
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = {});

namespace reco::emu {

// Where a collective or instruction was called: the kernel's file and line.
struct Site {
  const char* file;
  int line;
};
#define RECO_EMU_SITE ::reco::emu::Site file_line_ = {__builtin_FILE(), __builtin_LINE()}

// The emulated GPU (from RECO_EMULATE_CUDA=sm_80|sm_90 unless set here; sm_90 by default).
struct Arch {
  const char* name;
  int major, minor;
  int sms;
  int optin_smem;      // bytes per block with cudaFuncSetAttribute opt-in
  int smem_per_sm;     // bytes per multiprocessor
  int regs_per_block;  // 32-bit registers
};
const Arch& arch();
bool set_arch(const char* name);  // "sm_80" or "sm_90"; false for any other name

// What the real compiler reports for a kernel (nvcc -Xptxas -v): registers per thread (0: not
// checked) and static shared bytes (by default, the most any block of its launches declared).
void set_kernel_info(const void* kernel, int registers, size_t static_smem = size_t(-1));

// The report of the last failed launch on this OS thread ("" after a good one).
const char* last_report();

// The kernels launched in the process since the last call (demangled names, one per line, oldest
// first; at most the last 4096), and forgets them.
std::string take_launch_log();

// Emulated devices: this many, all of the emulated architecture; each OS thread has its current.
constexpr int kDevices = 2;

// Per-fiber indices, read by the threadIdx/blockIdx/blockDim/gridDim macros.
struct Indices {
  uint3 thread, block;
  dim3 block_dim, grid_dim;
};
extern thread_local const Indices* tls_indices;

// Block and warp collectives (the CUDA intrinsics below forward here).
enum class Vote { Ballot, Any, All };
enum class Shfl { Idx, Up, Down, Xor };
enum class Reduce { None, Or, And, Count };
int block_barrier(Reduce r, int pred, const char* what, Site s);
void warp_sync(unsigned mask, Site s);
unsigned warp_vote(Vote v, unsigned mask, int pred, Site s);
uint64_t warp_shfl(Shfl m, unsigned mask, uint64_t bits, int operand, int width, Site s);
unsigned active_mask();

// Atomic read-modify-write of a 32/64-bit word (checked when it lies in shared memory).
enum class Rmw { Add, Or, And, Xor, Max, Min, Exch, Cas };
uint32_t atomic32(void* p, Rmw op, uint32_t v, uint32_t cmp, bool is_signed, bool is_float, Site s);
uint64_t atomic64(void* p, Rmw op, uint64_t v, uint64_t cmp, bool is_float, Site s);

// Shared memory: the block's dynamic buffer, and one static __shared__ variable per slot.
unsigned char* dynamic_shared(const char* kernel = nullptr);  // kernel: names the launch's log
struct SharedSlot {
  uint64_t launch = 0;
  size_t offset = 0;
  void* get(size_t bytes, size_t align, const char* name, Site s);
};

// The PTX instructions of csrc/cuda/ptx.cuh. Registers are passed as the hardware holds them.
void mma_m16n8k16_f32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                      const float (&c)[4], bool bf16, Site s);
void mma_m16n8k32_s32(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                      const int (&c)[4], Site s);
void ldmatrix(int count, bool trans, uint32_t* regs, const void* addr, Site s);
void cp_async(void* dst, const void* src, int cp_size, int src_size, bool cg, Site s);
void cp_async_commit(Site s);
void cp_async_wait(int pending, Site s);

// Runs the grid: body(arg) is each thread's kernel call; returns the launch's error.
cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem,
                     void (*body)(void*), void* arg);

// kernel<<<grid, block, smem, stream>>>(args...): the arguments are converted to the kernel's
// parameter types on the launching thread, as the CUDA runtime copies them.
template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
                   A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with a wrong argument count");
  struct Call {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> args;
  } call{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  auto body = [](void* p) {
    Call& c = *static_cast<Call*>(p);
    std::apply(c.kernel, c.args);
  };
  return run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, body, &call);
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute a, int value);
cudaError_t func_get_attributes(cudaFuncAttributes* out, const void* kernel);

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "a 1 to 8 byte value");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace reco::emu

template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute a, int value) {
  return reco::emu::func_set_attribute(reinterpret_cast<const void*>(kernel), a, value);
}
template <typename F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* out, F* kernel) {
  return reco::emu::func_get_attributes(out, reinterpret_cast<const void*>(kernel));
}

#define threadIdx (::reco::emu::tls_indices->thread)
#define blockIdx (::reco::emu::tls_indices->block)
#define blockDim (::reco::emu::tls_indices->block_dim)
#define gridDim (::reco::emu::tls_indices->grid_dim)

// ---- synchronisation, votes, shuffles -----------------------------------------------------------
inline void __syncthreads(RECO_EMU_SITE) {
  reco::emu::block_barrier(reco::emu::Reduce::None, 0, "__syncthreads", file_line_);
}
inline int __syncthreads_or(int p, RECO_EMU_SITE) {
  return reco::emu::block_barrier(reco::emu::Reduce::Or, p, "__syncthreads_or", file_line_);
}
inline int __syncthreads_and(int p, RECO_EMU_SITE) {
  return reco::emu::block_barrier(reco::emu::Reduce::And, p, "__syncthreads_and", file_line_);
}
inline int __syncthreads_count(int p, RECO_EMU_SITE) {
  return reco::emu::block_barrier(reco::emu::Reduce::Count, p, "__syncthreads_count", file_line_);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, RECO_EMU_SITE) {
  reco::emu::warp_sync(mask, file_line_);
}
inline unsigned __ballot_sync(unsigned mask, int p, RECO_EMU_SITE) {
  return reco::emu::warp_vote(reco::emu::Vote::Ballot, mask, p, file_line_);
}
inline int __any_sync(unsigned mask, int p, RECO_EMU_SITE) {
  return int(reco::emu::warp_vote(reco::emu::Vote::Any, mask, p, file_line_));
}
inline int __all_sync(unsigned mask, int p, RECO_EMU_SITE) {
  return int(reco::emu::warp_vote(reco::emu::Vote::All, mask, p, file_line_));
}
inline unsigned __activemask() { return reco::emu::active_mask(); }
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = warpSize, RECO_EMU_SITE) {
  using namespace reco::emu;
  return from_bits<T>(warp_shfl(Shfl::Idx, mask, to_bits(v), src, width, file_line_));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize, RECO_EMU_SITE) {
  using namespace reco::emu;
  return from_bits<T>(warp_shfl(Shfl::Up, mask, to_bits(v), int(delta), width, file_line_));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize, RECO_EMU_SITE) {
  using namespace reco::emu;
  return from_bits<T>(warp_shfl(Shfl::Down, mask, to_bits(v), int(delta), width, file_line_));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize, RECO_EMU_SITE) {
  using namespace reco::emu;
  return from_bits<T>(warp_shfl(Shfl::Xor, mask, to_bits(v), lane_mask, width, file_line_));
}

// ---- atomics ------------------------------------------------------------------------------------
#define RECO_EMU_ATOMIC32(name, T, op, sgn, flt)                                           \
  inline T name(T* p, T v, RECO_EMU_SITE) {                                                \
    using namespace reco::emu;                                                             \
    return from_bits<T>(atomic32(p, Rmw::op, uint32_t(to_bits(v)), 0, sgn, flt, file_line_)); \
  }
RECO_EMU_ATOMIC32(atomicAdd, int, Add, true, false)
RECO_EMU_ATOMIC32(atomicAdd, unsigned, Add, false, false)
RECO_EMU_ATOMIC32(atomicAdd, float, Add, false, true)
RECO_EMU_ATOMIC32(atomicOr, int, Or, true, false)
RECO_EMU_ATOMIC32(atomicOr, unsigned, Or, false, false)
RECO_EMU_ATOMIC32(atomicAnd, int, And, true, false)
RECO_EMU_ATOMIC32(atomicAnd, unsigned, And, false, false)
RECO_EMU_ATOMIC32(atomicMax, int, Max, true, false)
RECO_EMU_ATOMIC32(atomicMax, unsigned, Max, false, false)
RECO_EMU_ATOMIC32(atomicMin, int, Min, true, false)
RECO_EMU_ATOMIC32(atomicMin, unsigned, Min, false, false)
RECO_EMU_ATOMIC32(atomicExch, int, Exch, true, false)
RECO_EMU_ATOMIC32(atomicExch, unsigned, Exch, false, false)
#undef RECO_EMU_ATOMIC32
inline int atomicCAS(int* p, int cmp, int v, RECO_EMU_SITE) {
  using namespace reco::emu;
  return from_bits<int>(
      atomic32(p, Rmw::Cas, uint32_t(to_bits(v)), uint32_t(to_bits(cmp)), true, false, file_line_));
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v, RECO_EMU_SITE) {
  return reco::emu::atomic64(p, reco::emu::Rmw::Add, v, 0, false, file_line_);
}

// ---- arithmetic and bit intrinsics --------------------------------------------------------------
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __uint_as_float(unsigned u) { return reco::emu::from_bits<float>(u); }
inline unsigned __float_as_uint(float f) { return unsigned(reco::emu::to_bits(f)); }
inline float __int_as_float(int i) { return reco::emu::from_bits<float>(unsigned(i)); }
inline int __float_as_int(float f) { return int(unsigned(reco::emu::to_bits(f))); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __int2float_rn(int i) { return float(i); }
inline int __popc(unsigned u) { return __builtin_popcount(u); }
inline int __popcll(unsigned long long u) { return __builtin_popcountll(u); }
inline int __clz(unsigned u) { return u ? __builtin_clz(u) : 32; }
inline int __ffs(unsigned u) { return __builtin_ffs(int(u)); }
inline unsigned __brev(unsigned u) {
  u = ((u >> 1) & 0x55555555u) | ((u & 0x55555555u) << 1);
  u = ((u >> 2) & 0x33333333u) | ((u & 0x33333333u) << 2);
  u = ((u >> 4) & 0x0f0f0f0fu) | ((u & 0x0f0f0f0fu) << 4);
  u = ((u >> 8) & 0x00ff00ffu) | ((u & 0x00ff00ffu) << 8);
  return (u >> 16) | (u << 16);
}
// CUDA's device min/max take any pair of arithmetic types.
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(b) < C(a) ? C(b) : C(a);
}
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) < C(b) ? C(b) : C(a);
}
using std::isinf;
using std::isnan;
