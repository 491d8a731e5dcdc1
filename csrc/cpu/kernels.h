// The CPU kernels: threads over rows; within a row the phases of opd_math.h over
// the row while it sits in cache, vector loops over the vocabulary.
#pragma once

#include <stdint.h>

#include "../opd_math.h"

namespace opd {

enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// A (..., V) tensor read in place: row r starts at ptr + (r / d1) st0 + (r % d1) st1
// elements, column v at + v stv.
struct Rows {
  const void* ptr;
  int dtype;
  int64_t d1, st0, st1, stv;
};

namespace cpu {

// Forward of the logits loss: the table (n, ROW_K); with `grad` (contiguous (n, V) in
// `grad_dtype`) also coef[r] * d loss_r / d z_S (coef: n floats).
void opd_forward(const Rows& s, const Rows& t, int64_t n, int64_t V, const int64_t* tok,
                 const float* sign, const float* coef, float* table, void* grad,
                 int grad_dtype, const Params& p, int nthreads);

// Recompute backward: grad_rows[r] * d loss_r / d z_S from the forward's table.
void opd_backward(const Rows& s, const Rows& t, int64_t n, int64_t V, const int64_t* tok,
                  const float* table, const float* grad_rows, void* grad, int grad_dtype,
                  const Params& p, int nthreads);

void sampled_forward(const Rows& s, int64_t n, int64_t V, const int64_t* tok,
                     const float* teacher_lp, const float* sign, const float* coef,
                     float* table, void* grad, int grad_dtype, const Params& p, int nthreads);

void sampled_backward(const Rows& s, int64_t n, int64_t V, const int64_t* tok,
                      const float* table, const float* grad_rows, void* grad, int grad_dtype,
                      const Params& p, int nthreads);

// The top-k teacher: per row r, with J category columns cols[r j] (ids outside [0, V)
// are no column), out[r] (TOPK_STREAM_K + J doubles) = the student's maximum m and its
// maximum outside the categories m_t (natural units z / tau, 0 where not finite),
// sum e^(z/tau - m), sum e^(z/tau - m) (z/tau - m), sum over the tokens outside the
// categories of e^(z/tau - m_t), then z/tau at each category column (0 for none).
constexpr int64_t TOPK_STREAM_K = 5;
void topk_stream(const Rows& s, int64_t n, int64_t V, const int64_t* cols, int64_t J,
                 double inv_temp, const int64_t* tok, int64_t ignore_index, double* out,
                 int nthreads);

// Its gradient: rowinfo[r] = (log|alpha_tail g / tau| - log Z_S, sign of alpha_tail g);
// every token outside the categories gets sign e^(z/tau + rowinfo[r][0]), the category
// columns get values[r j] (n, J).
void topk_backward(const Rows& s, int64_t n, int64_t V, const int64_t* cols, int64_t J,
                   const double* values, const double* rowinfo, double inv_temp,
                   const int64_t* tok, int64_t ignore_index, void* grad, int grad_dtype,
                   int nthreads);

// grad (n, V) contiguous *= g[0] (per_row: g[r] for row r); nothing when the factor is 1.
void scale_grad(void* grad, int dtype, int64_t n, int64_t V, const float* g, bool per_row,
                int nthreads);

// Which vector instruction set the dispatched kernels use here ("x86-64-v4", ...).
const char* isa();

}  // namespace cpu
}  // namespace opd
