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


// ---------------------------------------------------------------------------------------
// The UN / SM step of manifold_nets.adam.invariant_adam, fused per filter the same way.
//
//   UN:  r <- g - <x, g> x;  m <- b1 m + (1 - b1) r;  v <- b2 v + (1 - b2) |r|^2 / n (one
//        per filter) or r^2 (per entry);  d <- m / (sqrt(v) / c2 + eps), projected on the
//        tangent space for a per-entry v;  x <- Orth(x - lr / c1 d);  m <- m - <x, m> x
//   SM:  s <- |x| (left: the filter's norm; right: the column's);  h <- s g;
//        x <- (1 - lr wd) x;  m, v <- Adam's moments of h;  x <- x - lr / c1 s m / (...)
// with c1 = 1 - b1^t and c2 = sqrt(1 - b2^t) given by the caller, amsgrad's maximum of v
// taken before the division. The arithmetic is manifold_nets.adam's reference; the sums
// run in another order (tests/test_adam.py).
namespace {

struct AdamHyper {
  double lr, b1, b2, eps, wd, sign, c1, c2, normeps;
};

template <typename T, int KIND, bool AMS, bool PER_ENTRY>
inline void adam_row(T* __restrict__ x, const T* __restrict__ g, T* __restrict__ m,
                     T* __restrict__ v, T* __restrict__ vmax, int64_t n,
                     const T* __restrict__ colnorm, int64_t kernel, const AdamHyper& h) {
  const T b1 = T(h.b1), b2 = T(h.b2), eps = T(h.eps), sg = T(h.sign), c2 = T(h.c2);
  const T step = T(h.lr / h.c1), a1 = T(1) - b1, a2 = T(1) - b2;
  if (KIND == OBLIQUE) {
    T inner = T(0);
    for (int64_t k = 0; k < n; ++k) inner += x[k] * (sg * g[k]);
    T ss = T(0);
    for (int64_t k = 0; k < n; ++k) {
      const T r = sg * g[k] - inner * x[k];
      m[k] += a1 * (r - m[k]);
      if (PER_ENTRY) {
        v[k] = b2 * v[k] + a2 * r * r;
        if (AMS) vmax[k] = std::max(vmax[k], v[k]);
      } else {
        ss += r * r;
      }
    }
    T denom = T(0);
    if (!PER_ENTRY) {
      v[0] = b2 * v[0] + a2 * (ss / T(n));
      if (AMS) vmax[0] = std::max(vmax[0], v[0]);
      denom = std::sqrt(AMS ? vmax[0] : v[0]) / c2 + eps;
    }
    T xd = T(0);  // per entry: <x, d>, to project d on the tangent space
    if (PER_ENTRY)
      for (int64_t k = 0; k < n; ++k)
        xd += x[k] * (m[k] / (std::sqrt(AMS ? vmax[k] : v[k]) / c2 + eps));
    T nrm = T(0), xm = T(0);
    for (int64_t k = 0; k < n; ++k) {
      T d;
      if (PER_ENTRY) d = m[k] / (std::sqrt(AMS ? vmax[k] : v[k]) / c2 + eps) - xd * x[k];
      else d = m[k] / denom;
      const T xk = x[k] - step * d;
      x[k] = xk;
      nrm += xk * xk;
      xm += xk * m[k];
    }
    const T inv = T(1) / std::max(std::sqrt(nrm), T(h.normeps));
    const T tm = xm * inv;
    for (int64_t k = 0; k < n; ++k) {
      const T xk = x[k] * inv;
      x[k] = xk;
      m[k] -= tm * xk;
    }
    return;
  }
  // SM: left, one norm per row; right, one per column of `kernel` entries
  T s = T(0);
  if (KIND == SM_LEFT) {
    for (int64_t k = 0; k < n; ++k) s += x[k] * x[k];
    s = std::sqrt(std::min(s, std::numeric_limits<T>::max()));
  }
  const T decay = T(1) - T(h.lr * h.wd);
  for (int64_t k = 0; k < n; ++k) {
    const T f = KIND == SM_LEFT ? s : colnorm[k / kernel];
    const T hk = sg * g[k] * f;
    m[k] += a1 * (hk - m[k]);
    v[k] = b2 * v[k] + a2 * hk * hk;
    if (AMS) vmax[k] = std::max(vmax[k], v[k]);
    const T d = m[k] / (std::sqrt(AMS ? vmax[k] : v[k]) / c2 + eps);
    x[k] = x[k] * decay - step * f * d;
  }
}

template <typename T, int KIND, bool AMS, bool PER_ENTRY>
void adam_rows(T* x, const T* g, T* m, T* v, T* vmax, int64_t rows, int64_t n,
               const T* colnorm, int64_t kernel, const AdamHyper& h) {
  const int64_t vn = PER_ENTRY ? n : 1;
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      adam_row<T, KIND, AMS, PER_ENTRY>(x + i * n, g + i * n, m + i * n, v + i * vn,
                                        AMS ? vmax + i * vn : nullptr, n, colnorm, kernel,
                                        h);
  });
}

template <typename T, int KIND>
void adam_flags(T* x, const T* g, T* m, T* v, T* vmax, int64_t rows, int64_t n,
                const T* colnorm, int64_t kernel, const AdamHyper& h, bool ams,
                bool per_entry) {
  if (ams && per_entry) adam_rows<T, KIND, true, true>(x, g, m, v, vmax, rows, n, colnorm, kernel, h);
  else if (ams) adam_rows<T, KIND, true, false>(x, g, m, v, vmax, rows, n, colnorm, kernel, h);
  else if (per_entry) adam_rows<T, KIND, false, true>(x, g, m, v, vmax, rows, n, colnorm, kernel, h);
  else adam_rows<T, KIND, false, false>(x, g, m, v, vmax, rows, n, colnorm, kernel, h);
}

}  // namespace

// Update `param`, `exp_avg`, `exp_avg_sq` (and `max_exp_avg_sq` with amsgrad) in place.
// `exp_avg_sq` has the parameter's layout (per entry), or one entry per filter (UN).
void fused_adam_step(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg,
                     torch::Tensor exp_avg_sq, torch::Tensor max_exp_avg_sq, int64_t kind,
                     int64_t ndim, double lr, double beta1, double beta2, double eps,
                     double wd, bool amsgrad, bool maximize, double c1, double c2) {
  TORCH_CHECK(param.device().is_cpu() && param.is_non_overlapping_and_dense() &&
                  grad.strides() == param.strides() && grad.sizes() == param.sizes() &&
                  exp_avg.strides() == param.strides() && exp_avg.sizes() == param.sizes(),
              "fused_adam_step: dense CPU tensors, the gradient and moment laid out as the "
              "parameter");
  TORCH_CHECK(kind != SM_RIGHT || param.is_contiguous(),
              "fused_adam_step: SM's right metric needs a contiguous parameter");
  TORCH_CHECK(param.scalar_type() == grad.scalar_type(), "fused_adam_step: dtypes differ");
  const bool per_entry = exp_avg_sq.sizes() == param.sizes();
  TORCH_CHECK(per_entry ? exp_avg_sq.strides() == param.strides() : exp_avg_sq.is_contiguous(),
              "fused_adam_step: the second moment must be laid out as the parameter, or "
              "contiguous with one entry per filter");
  TORCH_CHECK(!amsgrad || (max_exp_avg_sq.sizes() == exp_avg_sq.sizes() &&
                           max_exp_avg_sq.strides() == exp_avg_sq.strides()),
              "fused_adam_step: max_exp_avg_sq must be laid out as exp_avg_sq");
  TORCH_CHECK(per_entry || kind == OBLIQUE, "fused_adam_step: a per-filter second moment "
              "is for UN only");
  const int64_t dims = param.dim();
  int64_t n = 1;
  if (kind == OBLIQUE || kind == SM_LEFT) {
    for (int64_t d = dims - ndim; d < dims; ++d) n *= param.size(d);
  }
  TORCH_CHECK(per_entry || exp_avg_sq.numel() * n == param.numel(),
              "fused_adam_step: a per-filter second moment needs one entry per filter");
  const AdamHyper h{lr, beta1, beta2, eps, wd, maximize ? -1.0 : 1.0, c1, c2,
                    param.scalar_type() == at::kFloat ? 1e-12 : 1e-30};
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "fused_adam_step", [&] {
    using T = scalar_t;
    T* x = param.data_ptr<T>();
    const T* g = grad.data_ptr<T>();
    T* m = exp_avg.data_ptr<T>();
    T* v = exp_avg_sq.data_ptr<T>();
    T* vmax = amsgrad ? max_exp_avg_sq.data_ptr<T>() : nullptr;
    if (kind == SM_RIGHT) {
      // theta: (*batch, out, in, *kernel): each block's rows see that block's column norms
      const int64_t out = param.size(dims - ndim), in = param.size(dims - ndim + 1);
      int64_t kernel = 1;
      for (int64_t d = dims - ndim + 2; d < dims; ++d) kernel *= param.size(d);
      const int64_t batch = param.numel() / (out * in * kernel), row = in * kernel;
      std::vector<T> colnorm = column_sqnorms(x, batch, out, in, kernel);
      for (auto& c : colnorm) c = std::sqrt(c);
      for (int64_t blk = 0; blk < batch; ++blk) {
        const int64_t off = blk * out * row;
        adam_flags<T, SM_RIGHT>(x + off, g + off, m + off, v + off,
                                amsgrad ? vmax + off : nullptr, out, row,
                                colnorm.data() + blk * in, kernel, h, amsgrad, true);
      }
      return;
    }
    const int64_t rows = n ? param.numel() / n : 0;
    if (kind == OBLIQUE)
      adam_flags<T, OBLIQUE>(x, g, m, v, vmax, rows, n, nullptr, 1, h, amsgrad, per_entry);
    else
      adam_flags<T, SM_LEFT>(x, g, m, v, vmax, rows, n, nullptr, 1, h, amsgrad, true);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_step", &fused_step, "The UN / SM / Euclidean step, fused per filter");
  m.def("fused_adam_step", &fused_adam_step, "InvariantAdam's UN / SM step, fused per filter");
}
