// Host interface of the CUDA kernels (csrc/cuda/kernels.cu). No CUDA header is
// needed to include it: bindings.cpp is compiled by the host compiler.
#pragma once

#include <stdint.h>

#include <string>

#include "../cpu/kernels.h"  // Rows, DType
#include "../opd_math.h"

namespace opd {
namespace cuda {

// Every launcher returns a cudaError_t (0: launched). `stream` is a cudaStream_t as an
// integer (0: the legacy default stream), `device` the device of the tensors.
int opd_forward(const Rows& s, const Rows& t, int64_t n, int64_t V, const int64_t* tok,
                const float* sign, const float* coef, float* table, void* grad, int grad_dtype,
                const Params& p, uintptr_t stream, int device);
int opd_backward(const Rows& s, const Rows& t, int64_t n, int64_t V, const int64_t* tok,
                 const float* table, const float* grad_rows, void* grad, int grad_dtype,
                 const Params& p, uintptr_t stream, int device);
int sampled_forward(const Rows& s, int64_t n, int64_t V, const int64_t* tok,
                    const float* teacher_lp, const float* sign, const float* coef, float* table,
                    void* grad, int grad_dtype, const Params& p, uintptr_t stream, int device);
int sampled_backward(const Rows& s, int64_t n, int64_t V, const int64_t* tok,
                     const float* table, const float* grad_rows, void* grad, int grad_dtype,
                     const Params& p, uintptr_t stream, int device);
// grad (n, V) contiguous *= g[0] (per_row: g[r]); the kernel reads g on the device and
// returns at once when the factor is 1.
int scale_grad(void* grad, int dtype, int64_t n, int64_t V, const float* g, bool per_row,
               uintptr_t stream, int device);

// The top-k teacher's passes (as cpu::topk_stream and cpu::topk_backward; one block per
// row, the categories marked in a bitmap of V bits in shared memory).
int topk_stream(const Rows& s, int64_t n, int64_t V, const int64_t* cols, int64_t J,
                double inv_temp, const int64_t* tok, int64_t ignore_index, double* out,
                uintptr_t stream, int device);
int topk_backward(const Rows& s, int64_t n, int64_t V, const int64_t* cols, int64_t J,
                  const double* values, const double* rowinfo, double inv_temp,
                  const int64_t* tok, int64_t ignore_index, void* grad, int grad_dtype,
                  uintptr_t stream, int device);
// Whether topk_stream takes rows of V columns with J categories on `device` (its bitmap
// and the categories' logits, ceil(V / 32) + J words, fit a block's shared memory).
bool topk_fits(int64_t V, int64_t J, int device);

// The plan a launch on `device` would use for rows of V columns (see opd::plan_rows).
Plan plan_for(int64_t V, int s_dtype, int t_dtype, int device);

int device_count();
std::string archs();  // the SASS and PTX targets this module was compiled for
void check(int err);  // throws std::runtime_error for an error code
int synchronize(int device);  // for tests only

}  // namespace cuda
}  // namespace opd
