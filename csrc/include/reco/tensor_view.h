// A non-owning view of a strided array (filled from DLPack by the bindings).
#pragma once
#include <cstdint>

#include "reco/dtype.h"

namespace reco {

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  int ndim = 0;
  int64_t shape[4] = {0, 0, 0, 0};
  int64_t strides[4] = {0, 0, 0, 0};  // in elements
  int device_type = 1;                // DLPack device type (1 = CPU, 2 = CUDA)
  int device_id = 0;

  // Optional arguments that were not given have ndim 0 (no op argument is a scalar array).
  bool present() const { return ndim != 0; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
};

}  // namespace reco
