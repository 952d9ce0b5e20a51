// The emulation build's <cuda_fp16.h>: storage of IEEE binary16 and exact conversions.
#pragma once
#include "reco_emu.h"

struct __half {
  unsigned short __x;
};
struct __half2 {
  __half x, y;
};

namespace reco::emu {
// binary16 -> binary32, exact (subnormals, inf, NaN).
inline float half_bits_to_float(unsigned short h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1f) return from_bits<float>(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    const float m = float(mant) * 0x1p-24f;
    return sign ? -m : m;
  }
  return from_bits<float>(sign | ((exp + 112) << 23) | (mant << 13));
}
// binary32 -> binary16, round to nearest even (the rounding of __float2half).
inline unsigned short float_to_half_bits(float f) {
  const uint32_t u = uint32_t(to_bits(f));
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<unsigned short>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: a subnormal half, units of 2^-24
    const float m = from_bits<float>(a) * 0x1p24f;  // exact scaling
    const float r = std::nearbyint(m);             // ties to even in the default mode
    return static_cast<unsigned short>(sign | uint32_t(r));
  }
  const uint32_t shifted = a - (112u << 23);  // rebias the exponent
  uint32_t h = shifted >> 13;
  const uint32_t rest = shifted & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
  return static_cast<unsigned short>(sign | h);
}
}  // namespace reco::emu

inline float __half2float(__half h) { return reco::emu::half_bits_to_float(h.__x); }
inline __half __float2half(float f) { return __half{reco::emu::float_to_half_bits(f)}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
