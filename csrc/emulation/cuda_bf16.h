// The emulation build's <cuda_bf16.h>: storage of bfloat16 and exact conversions.
#pragma once
#include "reco_emu.h"

struct __nv_bfloat16 {
  unsigned short __x;
};

inline float __bfloat162float(__nv_bfloat16 b) {
  return reco::emu::from_bits<float>(uint32_t(b.__x) << 16);
}
// Round to nearest even, NaN kept quiet (the rounding of __float2bfloat16).
inline __nv_bfloat16 __float2bfloat16(float f) {
  const uint32_t u = uint32_t(reco::emu::to_bits(f));
  if ((u & 0x7fffffffu) > 0x7f800000u)
    return __nv_bfloat16{static_cast<unsigned short>((u >> 16) | 0x40u)};
  const uint32_t r = u + 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<unsigned short>(r >> 16)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
