// The PTX the kernels use, the kernel launch and shared-memory declarations: the one header with
// an emulation branch. On the device each helper is one inline asm statement; in the emulation
// build (RECO_EMULATION, csrc/emulation) each is a call into the shim, which checks it.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

namespace reco::cuda::ptx {

template <typename T>
using type = T;  // lets RECO_SHARED name array types: RECO_SHARED(float[64], thr)

#if defined(RECO_EMULATION)

// A static __shared__ variable: RECO_SHARED(float[64], thr_s) declares thr_s of type float[64].
#define RECO_SHARED(T, name)                                                                      \
  static ::reco::emu::SharedSlot name##_slot_;                                                    \
  ::reco::cuda::ptx::type<T>& name = *static_cast<::reco::cuda::ptx::type<T>*>(                   \
      name##_slot_.get(sizeof(::reco::cuda::ptx::type<T>), alignof(::reco::cuda::ptx::type<T>), \
                       #name, ::reco::emu::Site{__FILE__, __LINE__}))
// The kernel's dynamic shared memory (extern __shared__), 16-byte aligned.
#define RECO_DYNAMIC_SHARED(name) \
  unsigned char* const name = ::reco::emu::dynamic_shared(__PRETTY_FUNCTION__)
#define RECO_PTX_SITE , ::reco::emu::Site file_line_ = {__builtin_FILE(), __builtin_LINE()}

// cp.async.cg.shared.global of 16 bytes, of which the first src_bytes are read and the rest zeroed.
inline void cp_async16(void* dst, const void* src, int src_bytes RECO_PTX_SITE) {
  ::reco::emu::cp_async(dst, src, 16, src_bytes, true, file_line_);
}
inline void cp_async_commit(::reco::emu::Site file_line_ = {__builtin_FILE(), __builtin_LINE()}) {
  ::reco::emu::cp_async_commit(file_line_);
}
template <int n>
inline void cp_async_wait(::reco::emu::Site file_line_ = {__builtin_FILE(), __builtin_LINE()}) {
  ::reco::emu::cp_async_wait(n, file_line_);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p RECO_PTX_SITE) {
  ::reco::emu::ldmatrix(4, false, r, p, file_line_);
}
inline void mma_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1 RECO_PTX_SITE) {
  const uint32_t b[2] = {b0, b1};
  const float in[4] = {c[0], c[1], c[2], c[3]};
  ::reco::emu::mma_m16n8k16_f32(c, a, b, in, false, file_line_);
}
inline void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1 RECO_PTX_SITE) {
  const uint32_t b[2] = {b0, b1};
  const float in[4] = {c[0], c[1], c[2], c[3]};
  ::reco::emu::mma_m16n8k16_f32(c, a, b, in, true, file_line_);
}
inline void mma_s8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1 RECO_PTX_SITE) {
  const uint32_t b[2] = {b0, b1};
  const int in[4] = {c[0], c[1], c[2], c[3]};
  ::reco::emu::mma_m16n8k32_s32(c, a, b, in, file_line_);
}

// kernel<<<grid, block, smem, stream>>>(args...); the launch's error is cudaGetLastError's.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            A&&... args) {
  ::reco::emu::launch(kernel, grid, block, smem, stream, std::forward<A>(args)...);
}
#undef RECO_PTX_SITE

#else  // the device

#define RECO_SHARED(T, name) __shared__ ::reco::cuda::ptx::type<T> name
#define RECO_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int n>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(n));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void mma_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            A&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
}

#endif

}  // namespace reco::cuda::ptx
