// Scalar types the kernels read, and exact conversions of the 16-bit formats to float.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define RECO_HD __host__ __device__ __forceinline__
#else
#define RECO_HD inline
#endif

namespace reco {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3, i64 = 4, i8 = 5, u8 = 6 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::f64: return "float64";
    case DType::i64: return "int64";
    case DType::i8: return "int8";
    case DType::u8: return "uint8";
  }
  return "?";
}

inline int dtype_size(DType t) {
  switch (t) {
    case DType::i8:
    case DType::u8: return 1;
    case DType::f16:
    case DType::bf16: return 2;
    case DType::f32: return 4;
    default: return 8;
  }
}

// Storage-only 16-bit types: the kernels convert them to float before any arithmetic.
struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

RECO_HD float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

RECO_HD float to_float(float x) { return x; }
RECO_HD float to_float(bf16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }

// IEEE binary16 -> binary32, exact, including subnormals, inf and NaN.
RECO_HD float to_float(half_t x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // Subnormal: normalise the mantissa.
    exp = 1;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    mant &= 0x3ffu;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

template <typename Acc, typename T>
RECO_HD Acc to_acc(T x) {
  return static_cast<Acc>(to_float(x));
}
template <>
RECO_HD double to_acc<double, double>(double x) {
  return x;
}

}  // namespace reco
