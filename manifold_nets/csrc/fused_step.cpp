// The UN / SM / Euclidean step of manifold_nets.optim.invariant_sgd, fused per filter.
//
// One call updates one parameter in place, filter by filter (a filter: one row of the
// parameter viewed as (rows, n)), in a few passes over a row that stays in cache, so the
// parameter, its gradient and its momentum buffer are each read and written once:
//
//   g  <- (maximize ? -grad : grad) + wd * x
//   r  <- rgrad_x(g)          UN: g - <x, g> x;  SM left: |x|^2 g;  SM right: g |theta_:,j|^2
//   b  <- init ? r : momentum * b + (1 - dampening) * r
//   d  <- nesterov ? r + momentum * b : b          (d = r without momentum)
//   x  <- x - lr * d
//   UN: x <- x / max(|x|, eps);  b <- b - <x, b> x  (transport by projection; <x, b> is
//   summed while x and b are updated, so UN takes three passes over a row)
//
// The arithmetic is the reference's (manifold_nets.optim._single_tensor_invariant_sgd);
// the sums run in another order, so the iterates agree to rounding (tests/test_fused.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

enum Kind : int64_t { EUCLIDEAN = 0, OBLIQUE = 1, SM_LEFT = 2, SM_RIGHT = 3 };

struct Hyper {
  double lr, momentum, buf_coef, wd, sign, eps;
};

// One row of n entries. `scale` is the row's metric factor (SM left), `colsq` the column
// factors (SM right, `cols` columns of `kernel` entries each). The momentum buffer of a
// first step is zero on entry and `buf_coef` is 1 (so b = r exactly); later buf_coef is
// 1 - dampening.
template <typename T, int KIND, bool BUF, bool NESTEROV>
inline void step_row(T* __restrict__ x, const T* __restrict__ g, T* __restrict__ b, int64_t n,
                     const T* __restrict__ colsq, int64_t cols, int64_t kernel,
                     const Hyper& h) {
  const T lr = T(h.lr), m = T(h.momentum), c = T(h.buf_coef), wd = T(h.wd), sg = T(h.sign);
  T factor = T(1), inner = T(0);
  if (KIND == OBLIQUE) {
    for (int64_t k = 0; k < n; ++k) inner += x[k] * (sg * g[k] + wd * x[k]);
  } else if (KIND == SM_LEFT) {
    T s = T(0);
    for (int64_t k = 0; k < n; ++k) s += x[k] * x[k];
    factor = std::min(s, std::numeric_limits<T>::max());
  }
  T nrm = T(0), xb = T(0);  // UN: |x - lr d|^2 and <x - lr d, b> for the last pass
  auto update = [&](int64_t k, T r) -> T {
    T d = r;
    if (BUF) {
      const T bk = m * b[k] + c * r;
      b[k] = bk;
      d = NESTEROV ? r + m * bk : bk;
    }
    const T xk = x[k] - lr * d;
    x[k] = xk;
    if (KIND == OBLIQUE && BUF) xb += xk * b[k];
    return xk;
  };
  if (KIND == SM_RIGHT) {
    for (int64_t j = 0; j < cols; ++j) {
      const T f = colsq[j];
      for (int64_t q = 0; q < kernel; ++q) {
        const int64_t k = j * kernel + q;
        update(k, (sg * g[k] + wd * x[k]) * f);
      }
    }
    return;
  }
  for (int64_t k = 0; k < n; ++k) {
    const T gk = sg * g[k] + wd * x[k];
    T r;
    if (KIND == OBLIQUE) r = gk - inner * x[k];
    else if (KIND == SM_LEFT) r = gk * factor;
    else r = gk;
    const T xk = update(k, r);
    if (KIND == OBLIQUE) nrm += xk * xk;
  }
  if (KIND == OBLIQUE) {
    // normalise, and transport the buffer: b - <x', b> x' with x' = x / |x|, where
    // <x', b> = <x, b> / |x| was summed in the pass above
    const T inv = T(1) / std::max(std::sqrt(nrm), T(h.eps));
    const T tb = xb * inv;
    for (int64_t k = 0; k < n; ++k) {
      const T xk = x[k] * inv;
      x[k] = xk;
      if (BUF) b[k] -= tb * xk;
    }
  }
}

template <typename T, int KIND, bool BUF, bool NESTEROV>
void step_rows(T* x, const T* g, T* b, int64_t rows, int64_t n, const T* colsq,
               int64_t cols, int64_t kernel, const Hyper& h) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      step_row<T, KIND, BUF, NESTEROV>(x + i * n, g + i * n, BUF ? b + i * n : nullptr, n,
                                       colsq, cols, kernel, h);
  });
}

template <typename T, int KIND>
void dispatch_flags(T* x, const T* g, T* b, int64_t rows, int64_t n, const T* colsq,
                    int64_t cols, int64_t kernel, const Hyper& h, bool buf, bool nesterov) {
  if (!buf) step_rows<T, KIND, false, false>(x, g, b, rows, n, colsq, cols, kernel, h);
  else if (nesterov) step_rows<T, KIND, true, true>(x, g, b, rows, n, colsq, cols, kernel, h);
  else step_rows<T, KIND, true, false>(x, g, b, rows, n, colsq, cols, kernel, h);
}

template <typename T>
void dispatch(int64_t kind, T* x, const T* g, T* b, int64_t rows, int64_t n, const T* colsq,
              int64_t cols, int64_t kernel, const Hyper& h, bool buf, bool nesterov) {
  switch (kind) {
    case OBLIQUE:
      return dispatch_flags<T, OBLIQUE>(x, g, b, rows, n, colsq, cols, kernel, h, buf,
                                        nesterov);
    case SM_LEFT:
      return dispatch_flags<T, SM_LEFT>(x, g, b, rows, n, colsq, cols, kernel, h, buf,
                                        nesterov);
    case SM_RIGHT:
      return dispatch_flags<T, SM_RIGHT>(x, g, b, rows, n, colsq, cols, kernel, h, buf,
                                         nesterov);
    default:
      return dispatch_flags<T, EUCLIDEAN>(x, g, b, rows, n, colsq, cols, kernel, h, buf,
                                          nesterov);
  }
}

// The column norms of the right SM metric: theta viewed as (batch, out, cols, kernel);
// colsq[b, j] = sum_{o, k} theta[b, o, j, k]^2, saturated at the dtype's largest value.
template <typename T>
std::vector<T> column_sqnorms(const T* x, int64_t batch, int64_t out, int64_t cols,
                              int64_t kernel) {
  std::vector<T> colsq(batch * cols, T(0));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t j = 0; j < cols; ++j) {
        const T* p = x + ((b * out + o) * cols + j) * kernel;
        T s = T(0);
        for (int64_t k = 0; k < kernel; ++k) s += p[k] * p[k];
        colsq[b * cols + j] += s;
      }
  for (auto& v : colsq) v = std::min(v, std::numeric_limits<T>::max());
  return colsq;
}

}  // namespace

// Update `param` (and `buf`, unless momentum is 0) in place. `ndim`: the manifold's ndim
// (the trailing dims of one filter, or of the (out, in, *kernel) block of the right metric).
void fused_step(torch::Tensor param, torch::Tensor grad, torch::Tensor buf, int64_t kind,
                int64_t ndim, double lr, double momentum, double dampening, double wd,
                bool nesterov, bool maximize, bool init) {
  // Rows are read as blocks of n entries from data_ptr: each filter must be one block of
  // memory, with the gradient and buffer laid out alike (manifold_nets.fused.refusal checks
  // the rest: the blocks' order, and contiguity for SM's right metric).
  TORCH_CHECK(param.device().is_cpu() && param.is_non_overlapping_and_dense() &&
                  grad.strides() == param.strides() && grad.sizes() == param.sizes(),
              "fused_step: dense CPU tensors, the gradient laid out as the parameter");
  TORCH_CHECK(kind != SM_RIGHT || param.is_contiguous(),
              "fused_step: SM's right metric needs a contiguous parameter");
  TORCH_CHECK(param.scalar_type() == grad.scalar_type(), "fused_step: dtypes differ");
  TORCH_CHECK(momentum == 0 || (buf.strides() == param.strides() &&
                                buf.sizes() == param.sizes()),
              "fused_step: the momentum buffer must be laid out as the parameter");
  const int64_t dims = param.dim();
  int64_t n = 1, rows = 1;
  if (kind == OBLIQUE || kind == SM_LEFT) {
    for (int64_t d = dims - ndim; d < dims; ++d) n *= param.size(d);
    rows = n ? param.numel() / n : 0;
  } else {
    n = dims ? param.size(dims - 1) : 1;
    rows = n ? param.numel() / n : 0;
  }
  if (momentum != 0 && init) buf.zero_();
  const Hyper h{lr, momentum, init ? 1.0 : 1.0 - dampening, wd, maximize ? -1.0 : 1.0,
                param.scalar_type() == at::kFloat ? 1e-12 : 1e-30};
  const bool use_buf = momentum != 0;
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "fused_step", [&] {
    using T = scalar_t;
    T* x = param.data_ptr<T>();
    const T* g = grad.data_ptr<T>();
    T* b = use_buf ? buf.data_ptr<T>() : nullptr;
    if (kind == SM_RIGHT) {
      // theta: (*batch, out, in, *kernel) with ndim = 2 + kernel dims; each block's rows
      // see that block's column norms
      const int64_t out = param.size(dims - ndim), in = param.size(dims - ndim + 1);
      int64_t kernel = 1;
      for (int64_t d = dims - ndim + 2; d < dims; ++d) kernel *= param.size(d);
      const int64_t batch = param.numel() / (out * in * kernel), row = in * kernel;
      const std::vector<T> colsq = column_sqnorms(x, batch, out, in, kernel);
      for (int64_t blk = 0; blk < batch; ++blk) {
        const int64_t off = blk * out * row;
        dispatch<T>(kind, x + off, g + off, use_buf ? b + off : nullptr, out, row,
                    colsq.data() + blk * in, in, kernel, h, use_buf, nesterov);
      }
      return;
    }
    dispatch<T>(kind, x, g, b, rows, n, nullptr, 1, 1, h, use_buf, nesterov);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_step", &fused_step, "The UN / SM / Euclidean step, fused per filter");
}
