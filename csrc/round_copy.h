// The update's rounding: target[i, j] = source[i, j] converted to target's dtype (round to
// nearest even, as c10's conversions do on host and device), for 2-D tensors of any strides.
#pragma once

#include "common.h"

namespace adapterops {

// Element `index` (row-major over the shape) of a 2-D strided tensor.
ADAPTEROPS_HOST_DEVICE inline int64_t strided_offset(int64_t index, int64_t cols,
                                                    int64_t row_stride, int64_t col_stride) {
  return (index / cols) * row_stride + (index % cols) * col_stride;
}

}  // namespace adapterops
