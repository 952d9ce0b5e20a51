// The floating-point mode the CPU kernels compute in: IEEE 754 gradual underflow (subnormal
// inputs and results honoured, as torch computes by default).
//
// Flush-to-zero and denormals-are-zero are per-thread state (MXCSR on x86, FPCR on aarch64):
// torch.set_flush_denormal(True) sets them on the calling thread only, not on OpenMP's workers,
// so a kernel that inherited them would flush on part of its key range only, and its results
// would depend on the thread split. Every thread that computes holds a HonourSubnormals for the
// duration of its work, which clears them and restores the caller's mode afterwards.
#pragma once
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <xmmintrin.h>
#define RECO_FP_MODE_X86 1
#elif defined(__aarch64__)
#define RECO_FP_MODE_ARM64 1
#endif

namespace reco::cpu {

class HonourSubnormals {
 public:
  HonourSubnormals() {
#if defined(RECO_FP_MODE_X86)
    saved_ = _mm_getcsr();
    if (saved_ & kFlush) _mm_setcsr(saved_ & ~kFlush);
#elif defined(RECO_FP_MODE_ARM64)
    uint64_t fpcr;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
    saved_ = fpcr;
    if (fpcr & kFlush) __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr & ~kFlush));
#endif
  }
  ~HonourSubnormals() {
#if defined(RECO_FP_MODE_X86)
    if (saved_ & kFlush) _mm_setcsr(saved_);
#elif defined(RECO_FP_MODE_ARM64)
    if (saved_ & kFlush) __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_));
#endif
  }
  HonourSubnormals(const HonourSubnormals&) = delete;
  HonourSubnormals& operator=(const HonourSubnormals&) = delete;

 private:
#if defined(RECO_FP_MODE_X86)
  static constexpr unsigned kFlush = 0x8040;  // MXCSR.FTZ (bit 15) | MXCSR.DAZ (bit 6)
  unsigned saved_ = 0;
#elif defined(RECO_FP_MODE_ARM64)
  static constexpr uint64_t kFlush = (uint64_t(1) << 24) | (uint64_t(1) << 19);  // FPCR.FZ, FZ16
  uint64_t saved_ = 0;
#endif
};

}  // namespace reco::cpu
