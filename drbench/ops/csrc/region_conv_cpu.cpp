// CPU kernels of drbench's compiled region convolution (drbench/ops/region_conv_cpu.py holds the maths and the
// autograd wiring; this file moves memory and calls the BLAS).
//
// Output positions are ordered by (region, sample): a *segment* is one sample's positions in one region, and a
// region's segments are consecutive, so a region is one range of columns too. Everything is kept column-major in
// positions, as NCHW tensors are: a feature matrix is (K, N) with one column per position, so gathering and
// scattering read and write rows of the input and output and the GEMMs need no transpose. A column's features
// (K values) are either
//   - its patch (im2col, filter order [c][tap]) when no coefficients are given, or
//   - coefficient stencils: row q * C + c holds sum_tap coeffs[b, t, q, tap] * x[b, c, tap].
// With autograd the whole batch is routed, gathered, multiplied and scattered once, and the features are kept for
// the backward; without it, blocked_forward does the same a block of output rows at a time, in cache.
// Every parallel loop owns what it writes (segments, (sample, channel) pairs, samples or blocks), so results do not
// depend on the thread count.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

// The BLAS that torch's CPU build carries (MKL on x86, OpenBLAS elsewhere) exports the Fortran interface: a call
// costs well under a microsecond, where at::mm's dispatch costs several, which layers with small maps and many
// regions repeat dozens of times per forward.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

// With DRBENCH_OPENBLAS (the scipy-openblas32 package found at build time), the products go to OpenBLAS: on the
// development VM's AMD cores MKL runs its generic kernels, about 44 G multiply-adds/s per core on
// a (116 x 116) @ (116 x 98) product, where OpenBLAS's AVX-512 kernels run 87 (Haswell's AVX2 kernels: 54).
// OpenBLAS is kept to one thread; a product outside our parallel loops, with torch on several threads, is split
// between torch's threads by columns (gemm).
#ifdef DRBENCH_OPENBLAS
extern "C" {
void scipy_sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                  const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                  const float* beta, float* c, const int* ldc);
void scipy_dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                  const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                  const double* beta, double* c, const int* ldc);
void scipy_openblas_set_num_threads(int threads);
char* scipy_openblas_get_corename();
}
#endif

namespace {

// Whether this product runs on one thread: inside a parallel loop of ours, or with torch on one thread.
inline bool on_one_thread() { return at::in_parallel_region() || at::get_num_threads() == 1; }

#ifdef DRBENCH_OPENBLAS
constexpr bool kOpenBLAS = true;
#else
constexpr bool kOpenBLAS = false;
#endif

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                      const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                      const int* ldc, bool openblas) {
#ifdef DRBENCH_OPENBLAS
  if (openblas) return scipy_sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#endif
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
                      const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
                      const int* ldc, bool openblas) {
#ifdef DRBENCH_OPENBLAS
  if (openblas) return scipy_dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#endif
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Products with a handful of columns (the positions of one region in a small map at batch 1) are bound by reading
// A, the weights; the BLAS's GEMM packs A first and took seven times as long as one read of it here. Below this many
// columns, each row of A is read once and dotted with the (transposed, cached) columns of B.
constexpr int64_t kSkinnyColumns = 24;

// row(i) gives row i of A (K values), which may be made on demand (blocked_forward's factored filters).
template <typename scalar_t, typename Row>
void skinny_gemm_rows(int64_t M, int64_t N, int64_t K, Row row_of, const scalar_t* B, int64_t ldb, scalar_t beta,
                      scalar_t* C, int64_t ldc) {
  std::vector<scalar_t> columns(N * K);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < N; ++j) columns[j * K + k] = B[k * ldb + j];
  }
  auto store = [&](int64_t i, int64_t j, scalar_t sum) {
    C[i * ldc + j] = beta == scalar_t(0) ? sum : sum + beta * C[i * ldc + j];
  };
  for (int64_t i = 0; i < M; ++i) {
    const scalar_t* row = row_of(i);
    int64_t j = 0;
    for (; j + 4 <= N; j += 4) {  // four columns per pass over the row: each load of A feeds four multiply-adds
      const scalar_t *c0 = columns.data() + j * K, *c1 = c0 + K, *c2 = c1 + K, *c3 = c2 + K;
      scalar_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t a = row[k];
        s0 += a * c0[k];
        s1 += a * c1[k];
        s2 += a * c2[k];
        s3 += a * c3[k];
      }
      store(i, j, s0);
      store(i, j + 1, s1);
      store(i, j + 2, s2);
      store(i, j + 3, s3);
    }
    for (; j < N; ++j) {
      const scalar_t* column = columns.data() + j * K;
      scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < K; ++k) sum += row[k] * column[k];
      store(i, j, sum);
    }
  }
}

template <typename scalar_t>
void skinny_gemm(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda, const scalar_t* B, int64_t ldb,
                 scalar_t beta, scalar_t* C, int64_t ldc) {
  skinny_gemm_rows(M, N, K, [&](int64_t i) { return A + i * lda; }, B, ldb, beta, C, ldc);
}

// The fewest columns (or rows) of a product that a thread of our own takes on with OpenBLAS.
constexpr int64_t kColumnsPerTask = 32;

// Row-major C (M x N, row stride ldc) = op(A) (M x K) @ op(B) (K x N) + beta * C, op transposing a matrix stored
// row-major with row stride lda / ldb.
template <typename scalar_t>
void gemm(bool transpose_a, bool transpose_b, int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
          const scalar_t* B, int64_t ldb, scalar_t beta, scalar_t* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == scalar_t(0) ? scalar_t(0) : beta * C[i * ldc + j];
    }
    return;
  }
  if (!transpose_a && !transpose_b && N <= kSkinnyColumns) {
    skinny_gemm(M, N, K, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  // a column-major BLAS computes C^T = op(B)^T op(A)^T; `openblas`: OpenBLAS on this thread, else torch's BLAS
  auto product = [&](int64_t rows, int64_t columns, const scalar_t* a, const scalar_t* b, scalar_t* c, bool openblas) {
    const int m = static_cast<int>(columns), n = static_cast<int>(rows), k = static_cast<int>(K);
    const int la = static_cast<int>(std::max<int64_t>(1, lda)), lb = static_cast<int>(std::max<int64_t>(1, ldb));
    const int lc = static_cast<int>(std::max<int64_t>(1, ldc));
    const scalar_t one = 1;
    blas_gemm(transpose_b ? "T" : "N", transpose_a ? "T" : "N", &m, &n, &k, &one, b, &lb, a, &la, &beta, c, &lc,
              openblas);
  };
  const bool one_thread = on_one_thread();
  if (kOpenBLAS && !one_thread) {  // torch's threads each run OpenBLAS on a share of C's columns (or rows, if fewer)
    if (N >= M) {
      at::parallel_for(0, N, kColumnsPerTask, [&](int64_t begin, int64_t end) {
        product(M, end - begin, A, transpose_b ? B + begin * ldb : B + begin, C + begin, true);
      });
    } else {
      at::parallel_for(0, M, kColumnsPerTask, [&](int64_t begin, int64_t end) {
        product(end - begin, N, transpose_a ? A + begin : A + begin * lda, B, C + begin * ldc, true);
      });
    }
    return;
  }
  product(M, N, A, B, C, kOpenBLAS);
}

// One matrix of a weight tensor whose last dimension is contiguous: its first element and row stride.
template <typename scalar_t>
struct Matrix {
  const scalar_t* data;
  int64_t stride;
};

template <typename scalar_t>
Matrix<scalar_t> matrix(const at::Tensor& w, int64_t i) {
  return {w.data_ptr<scalar_t>() + i * w.stride(0), w.stride(1)};
}

template <typename scalar_t>
Matrix<scalar_t> matrix(const at::Tensor& w, int64_t i, int64_t j) {
  return {w.data_ptr<scalar_t>() + i * w.stride(0) + j * w.stride(1), w.stride(2)};
}

struct Geometry {
  int64_t batch, channels, height, width;  // input
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;  // kernel, stride, padding, dilation
  int64_t out_h, out_w;

  int64_t taps() const { return kh * kw; }
  int64_t positions() const { return out_h * out_w; }
  int64_t pixels() const { return height * width; }
};

Geometry make_geometry(const at::Tensor& x, const std::vector<int64_t>& conv, int64_t out_h, int64_t out_w) {
  TORCH_CHECK(conv.size() == 8, "conv args: kh, kw, sh, sw, ph, pw, dh, dw");
  return {x.size(0), x.size(1), x.size(2), x.size(3), conv[0], conv[1], conv[2], conv[3],
          conv[4], conv[5], conv[6], conv[7], out_h, out_w};
}

// Where each tap of output position p reads in its input channel (h * W + w), -1 outside the image.
inline void tap_sources(const Geometry& g, int64_t p, int32_t* sources) {
  const int64_t ho = p / g.out_w, wo = p % g.out_w;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t h = ho * g.sh - g.ph + i * g.dh;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t w = wo * g.sw - g.pw + j * g.dw;
      const bool inside = h >= 0 && h < g.height && w >= 0 && w < g.width;
      sources[i * g.kw + j] = inside ? static_cast<int32_t>(h * g.width + w) : -1;
    }
  }
}

// The tap sources of every column: (N, taps) int32.
at::Tensor column_sources(const Geometry& g, const at::Tensor& order) {
  const int64_t columns = order.size(0), T = g.taps(), P = g.positions();
  at::Tensor sources = at::empty({columns, T}, order.options().dtype(at::kInt));
  const int64_t* order_p = order.data_ptr<int64_t>();
  int32_t* out = sources.data_ptr<int32_t>();
  at::parallel_for(0, columns, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) tap_sources(g, order_p[n], out + n * T);
  });
  return sources;
}

// Runs fn(segment) for every segment, in parallel; a segment owns its columns.
template <typename F>
void for_each_segment(int64_t segments, F fn) {
  at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) fn(s);
  });
}

at::Tensor optional_contiguous(const c10::optional<at::Tensor>& tensor) {
  return tensor.has_value() && tensor->defined() ? tensor->contiguous() : at::Tensor();
}

// Calls fn(tap, first position, first source, count) for every run of output positions along a row whose tap
// reads inside the image: positions first + k read the channel at source + k * stride, for k < count. Output rows
// [row_begin, row_end) only (all by default). Dense
// stencils over whole rows vectorise where per-position lookups would not.
template <typename F>
void for_each_tap_run(const Geometry& g, F fn, int64_t row_begin = 0, int64_t row_end = -1) {
  if (row_end < 0) row_end = g.out_h;
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t shift = j * g.dw - g.pw;  // input column of output column wo: wo * sw + shift
      const int64_t lo = shift >= 0 ? 0 : (-shift + g.sw - 1) / g.sw;
      const int64_t hi = g.width - 1 - shift < 0 ? -1 : std::min(g.out_w - 1, (g.width - 1 - shift) / g.sw);
      if (hi < lo) continue;
      for (int64_t ho = row_begin; ho < row_end; ++ho) {
        const int64_t h = ho * g.sh - g.ph + i * g.dh;
        if (h < 0 || h >= g.height) continue;
        fn(i * g.kw + j, ho * g.out_w + lo, h * g.width + lo * g.sw + shift, hi - lo + 1);
      }
    }
  }
}

// to[k] += weight(k) * from[k * stride], weight(k) = weights[k] or the scalar weights[0]: the inner loop of every
// stencil, written so that the compiler vectorises the common stride 1.
template <bool kPerPosition, typename scalar_t>
inline void axpy_run(scalar_t* __restrict__ to, const scalar_t* __restrict__ weights,
                     const scalar_t* __restrict__ from, int64_t count, int64_t stride) {
  if (stride == 1) {
    if (kPerPosition) {
      for (int64_t k = 0; k < count; ++k) to[k] += weights[k] * from[k];
    } else {
      const scalar_t weight = weights[0];
      for (int64_t k = 0; k < count; ++k) to[k] += weight * from[k];
    }
    return;
  }
  for (int64_t k = 0; k < count; ++k) to[k] += (kPerPosition ? weights[k] : weights[0]) * from[k * stride];
}

// The sum of count values, in vector lanes.
template <typename scalar_t>
scalar_t sum_of(const scalar_t* values, int64_t count) {
  scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < count; ++k) sum += values[k];
  return sum;
}

// Scratch memory that grows without being filled: std::vector's resize writes every new element, and a forward at
// batch 1 that makes its filters (megabytes in a wide layer) spent as long in that memset as in making them.
template <typename T>
class Scratch {
 public:
  void reserve(int64_t size) {
    if (size > capacity_) {
      data_.reset(new T[size]);  // default-initialised: arithmetic types are left unwritten
      capacity_ = size;
    }
  }
  T* data() { return data_.get(); }

 private:
  std::unique_ptr<T[]> data_;
  int64_t capacity_ = 0;
};

// to[i] = from[index[i]] + add, for i < count, where index[i] >= 0; 0 where it is negative (outside the image) when
// `negatives` says there may be such. Without negatives the loop vectorises into gathers (a conditional load does
// not, with gcc 12).
template <typename scalar_t>
inline void gather(scalar_t* __restrict__ to, const scalar_t* __restrict__ from, const int32_t* __restrict__ index,
                   int64_t count, bool negatives, scalar_t add = scalar_t(0)) {
  if (!negatives) {
    for (int64_t i = 0; i < count; ++i) to[i] = from[index[i]] + add;
    return;
  }
  for (int64_t i = 0; i < count; ++i) to[i] = index[i] >= 0 ? from[index[i]] + add : scalar_t(0);
}

// filter[k * T + tap] = sum_q coef[q * T + tap] * factors[q][k], for k < size: one (sample, region) filter made
// from its factors; a 1x1 filter (T = 1) as Q vectorised passes over the output.
template <typename scalar_t>
void make_filter(const std::vector<const scalar_t*>& factors, const scalar_t* coef, int64_t Q, int64_t T,
                 int64_t size, scalar_t* filter) {
  if (T == 1) {
    for (int64_t k = 0; k < size; ++k) filter[k] = coef[0] * factors[0][k];
    for (int64_t q = 1; q < Q; ++q) axpy_run<false>(filter, coef + q, factors[q], size, 1);
    return;
  }
  for (int64_t k = 0; k < size; ++k) {
    for (int64_t tap = 0; tap < T; ++tap) {
      scalar_t value = 0;
      for (int64_t q = 0; q < Q; ++q) value += coef[q * T + tap] * factors[q][k];
      filter[k * T + tap] = value;
    }
  }
}

// out[p] = sum_tap coef(tap, p) * channel at tap of p, over every output position p; coef(tap, p) is
// coefs[tap * P + p] (a coefficient per position) or coefs[tap] (one per tap).
template <bool kPerPosition, typename scalar_t>
void stencil(const Geometry& g, const scalar_t* channel, const scalar_t* coefs, scalar_t* out) {
  const int64_t P = g.positions();
  std::fill(out, out + P, scalar_t(0));
  for_each_tap_run(g, [&](int64_t tap, int64_t first, int64_t source, int64_t count) {
    const scalar_t* weights = kPerPosition ? coefs + tap * P + first : coefs + tap;
    axpy_run<kPerPosition>(out + first, weights, channel + source, count, g.sw);
  });
}

// Per-position coefficients of one sample, (Q, taps, P): coeffs[b, region of p, q, tap] at [q][tap][p].
template <typename scalar_t>
void position_coefficients(const Geometry& g, const scalar_t* coeffs, int64_t regions, int64_t Q,
                           const int64_t* mask, int64_t b, scalar_t* out) {
  const int64_t P = g.positions(), T = g.taps();
  for (int64_t p = 0; p < P; ++p) {
    const scalar_t* coef = coeffs + (b * regions + mask[b * P + p]) * Q * T;
    for (int64_t k = 0; k < Q * T; ++k) out[k * P + p] = coef[k];
  }
}

// Calls fn(column, position) for every column of sample b, region by region.
template <typename F>
inline void for_each_column(const int64_t* offsets, const int64_t* order, int64_t regions, int64_t batch, int64_t b,
                            F fn) {
  for (int64_t t = 0; t < regions; ++t) {
    const int64_t s = t * batch + b;
    for (int64_t n = offsets[s]; n < offsets[s + 1]; ++n) fn(n, order[n]);
  }
}

// Calls fn(b, c, tap, n, source) for every element of every column's patch (source: where it lies in channel c of
// sample b, -1 outside the image), a (sample, channel) pair per parallel job: the traversal shared by gathering
// patches and by its adjoint, whose job owns its channel's gradient.
template <typename F>
void for_each_patch_element(const Geometry& g, const int32_t* sources, const int64_t* offsets, const int64_t* order,
                            int64_t regions, F fn) {
  const int64_t C = g.channels, T = g.taps();
  at::parallel_for(0, g.batch * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / C, c = job % C;
      for (int64_t tap = 0; tap < T; ++tap) {
        for_each_column(offsets, order, regions, g.batch, b, [&](int64_t n, int64_t) {
          fn(b, c, tap, n, sources[n * T + tap]);
        });
      }
    }
  });
}

// Calls fn(b, c, q, coefs, values) for every sample, channel and stencil term, with coefs the per-position
// coefficients of term q for sample b ((taps, P), from position_coefficients) and values a P-element buffer of the
// calling thread; the channels of a sample run side by side. Shared by making stencils and by their adjoint.
template <typename scalar_t, typename F>
void for_each_stencil_row(const Geometry& g, const scalar_t* coeffs, int64_t regions, int64_t Q, const int64_t* mask,
                          F fn) {
  const int64_t T = g.taps(), P = g.positions();
  std::vector<scalar_t> coefs(Q * T * P);
  for (int64_t b = 0; b < g.batch; ++b) {
    position_coefficients(g, coeffs, regions, Q, mask, b, coefs.data());
    at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> values(P);
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t q = 0; q < Q; ++q) fn(b, c, q, coefs.data() + q * T * P, values.data());
      }
    });
  }
}

// out[i] = the region t < regions whose score scores[t * stride + i] is largest, for i < count (best: count values
// of scratch): ties to the lowest index and NaN winning, as torch.argmax. Rows of positions are compared region by
// region, so the comparisons vectorise.
template <typename scalar_t>
void argmax_regions(const scalar_t* scores, int64_t stride, int64_t regions, int64_t count, scalar_t* best,
                    int64_t* out) {
  for (int64_t i = 0; i < count; ++i) {
    best[i] = scores[i];
    out[i] = 0;
  }
  for (int64_t t = 1; t < regions; ++t) {
    const scalar_t* value = scores + t * stride;
    for (int64_t i = 0; i < count; ++i) {
      // NaN wins once and stays: a later value never compares greater than a NaN best
      const bool take = (value[i] > best[i] || (value[i] != value[i] && best[i] == best[i]));
      best[i] = take ? value[i] : best[i];
      out[i] = take ? t : out[i];
    }
  }
}

}  // namespace

// The region of each position, (B * P) int64: argmax over dim 1 (argmax_regions), in runs of positions.
at::Tensor region_mask(const at::Tensor& guide_in) {
  TORCH_CHECK(guide_in.dim() == 4, "guide must be (B, m, H', W')");
  const at::Tensor guide = guide_in.contiguous();
  const int64_t batch = guide.size(0), regions = guide.size(1), positions = guide.size(2) * guide.size(3);
  constexpr int64_t kRun = 256;
  const int64_t runs = (positions + kRun - 1) / kRun;
  at::Tensor mask = at::empty({batch * positions}, guide.options().dtype(at::kLong));
  int64_t* mask_p = mask.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(guide.scalar_type(), "region_mask", [&] {
    const scalar_t* g = guide.data_ptr<scalar_t>();
    at::parallel_for(0, batch * runs, 1, [&](int64_t begin, int64_t end) {
      scalar_t best[kRun];
      for (int64_t job = begin; job < end; ++job) {
        const int64_t b = job / runs, first = (job % runs) * kRun, count = std::min(kRun, positions - first);
        argmax_regions(g + b * regions * positions + first, positions, regions, count, best,
                       mask_p + b * positions + first);
      }
    });
  });
  return mask;
}

// The positions ordered by (region, sample, position): (order (N), offsets (m * B + 1)); segment s = t * B + b
// holds columns [offsets[s], offsets[s + 1]), and order holds each column's position in its sample. A counting
// sort on the mask of region_mask.
std::vector<at::Tensor> route(const at::Tensor& guide) {
  const at::Tensor mask = region_mask(guide);
  const int64_t batch = guide.size(0), regions = guide.size(1), positions = guide.size(2) * guide.size(3);
  const int64_t segments = regions * batch;
  const int64_t* mask_p = mask.data_ptr<int64_t>();
  at::Tensor offsets = at::zeros({segments + 1}, mask.options());
  int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t p = 0; p < positions; ++p) off[mask_p[b * positions + p] * batch + b + 1]++;
  }
  for (int64_t s = 0; s < segments; ++s) off[s + 1] += off[s];
  at::Tensor order = at::empty({batch * positions}, mask.options());
  int64_t* order_p = order.data_ptr<int64_t>();
  std::vector<int64_t> next(off, off + segments);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t p = 0; p < positions; ++p) order_p[next[mask_p[b * positions + p] * batch + b]++] = p;
  }
  return {mask, order, offsets};
}

// Feature columns (K, N): patches (K = C * taps) or, with coeffs (B, m, Q, taps), stencils (K = Q * C), made densely
// for a whole channel, then gathered into column order. A (sample, channel) pair owns its rows' columns.
at::Tensor gather_features(const at::Tensor& x_in, const at::Tensor& mask, const at::Tensor& order,
                           const at::Tensor& offsets, const c10::optional<at::Tensor>& coeffs_in,
                           const std::vector<int64_t>& conv, int64_t out_h, int64_t out_w) {
  const at::Tensor x = x_in.contiguous();
  const Geometry g = make_geometry(x, conv, out_h, out_w);
  const at::Tensor coeffs = optional_contiguous(coeffs_in);
  const bool stencils = coeffs.defined();
  const int64_t N = order.size(0), C = g.channels, T = g.taps(), HW = g.pixels(), P = g.positions();
  const int64_t Q = stencils ? coeffs.size(2) : 0, K = stencils ? Q * C : C * T, batch = g.batch;
  const int64_t regions = (offsets.size(0) - 1) / batch;
  const at::Tensor sources = stencils ? at::Tensor() : column_sources(g, order);
  at::Tensor features = at::empty({K, N}, x.options());
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* order_p = order.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gather_features", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* out = features.data_ptr<scalar_t>();
    if (!stencils) {
      for_each_patch_element(g, sources.data_ptr<int32_t>(), off, order_p, regions,
                             [&](int64_t b, int64_t c, int64_t tap, int64_t n, int32_t from) {
        out[(c * T + tap) * N + n] = from >= 0 ? xp[(b * C + c) * HW + from] : scalar_t(0);
      });
      return;
    }
    for_each_stencil_row(g, coeffs.data_ptr<scalar_t>(), regions, Q, mask.data_ptr<int64_t>(),
                         [&](int64_t b, int64_t c, int64_t q, const scalar_t* coefs, scalar_t* values) {
      stencil<true>(g, xp + (b * C + c) * HW, coefs, values);
      scalar_t* row = out + (q * C + c) * N;
      for_each_column(off, order_p, regions, batch, b, [&](int64_t n, int64_t p) { row[n] = values[p]; });
    });
  });
  return features;
}

namespace {

// Calls fn(weight matrix of a tensor, column first, column count) for each GEMM: one per region over its segments,
// or one per segment when per_sample. A weight tensor is (m, O, K), or (m, B, O, K) when per_sample, with a
// contiguous last dimension. Regions run one after the other with threaded GEMMs; segments side by side, one thread
// each.
template <typename scalar_t, typename F>
void for_each_gemm(const at::Tensor& offsets, int64_t regions, bool per_sample, F fn) {
  const int64_t segments = offsets.size(0) - 1, batch = segments / regions;
  const int64_t* off = offsets.data_ptr<int64_t>();
  if (per_sample) {
    for_each_segment(segments, [&](int64_t s) {
      auto select = [&](const at::Tensor& w) { return matrix<scalar_t>(w, s / batch, s % batch); };
      if (off[s + 1] > off[s]) fn(select, off[s], off[s + 1] - off[s]);
    });
    return;
  }
  for (int64_t t = 0; t < regions; ++t) {
    auto select = [&](const at::Tensor& w) { return matrix<scalar_t>(w, t); };
    const int64_t first = off[t * batch], last = off[(t + 1) * batch];
    if (last > first) fn(select, first, last - first);
  }
}

std::vector<at::Tensor> last_dim_contiguous(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> result;
  for (const auto& t : tensors) result.push_back(t.stride(-1) == 1 ? t : t.contiguous());
  return result;
}

}  // namespace

// out (O, N) = sum_i weights[i][selected] (O, K_i) @ features[block i, columns], per GEMM of for_each_gemm. The
// blocks are consecutive feature rows.
at::Tensor bucket_matmul(const at::Tensor& features, const at::Tensor& offsets,
                         const std::vector<at::Tensor>& weights_in, int64_t regions, bool per_sample) {
  const std::vector<at::Tensor> weights = last_dim_contiguous(weights_in);
  const int64_t O = weights[0].size(-2), N = features.size(1);
  at::Tensor out = at::empty({O, N}, features.options());
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "bucket_matmul", [&] {
    const scalar_t* f = features.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for_each_gemm<scalar_t>(offsets, regions, per_sample, [&](auto select, int64_t first, int64_t count) {
      int64_t row = 0;
      for (size_t i = 0; i < weights.size(); ++i) {
        const Matrix<scalar_t> w = select(weights[i]);
        const int64_t width = weights[i].size(-1);
        gemm<scalar_t>(false, false, O, count, width, w.data, w.stride, f + row * N + first, N,
                       scalar_t(i == 0 ? 0 : 1), o + first, N);
        row += width;
      }
    });
  });
  return out;
}

// A forward that nothing will differentiate, a block of output rows of one sample at a time, everything between
// reading x and writing out kept in cache: the block's positions sorted by region (a counting sort), their features
// gathered into columns, one GEMM per region present, the results written into the block's rows of out. This
// avoids the whole-batch feature and column matrices, whose passes through memory dominate layers with few
// channels. Ways as in bucketed_forward (Python): stencils (coeffs and stencils), filters made per (sample, region)
// from the factors (coeffs, not stencils), or given filters (no coeffs; weights (m, O, K), or (m, B, O, K) when
// per_sample). Blocks run side by side, one thread each. Returns out and the region of each output position
// (B, H', W'): the argmax of the guided feature `guide`, or, for a pointwise layer given no guided feature, of the
// guide convolution `guide_weight` (m, C) (+ `guide_bias`) applied to each block's columns as they are routed.
std::tuple<at::Tensor, at::Tensor> blocked_forward(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& guide_in,
    const c10::optional<at::Tensor>& guide_weight_in, const c10::optional<at::Tensor>& guide_bias_in,
    const c10::optional<at::Tensor>& coeffs_in, const std::vector<at::Tensor>& weights_in, bool per_sample,
    bool stencils, const std::vector<int64_t>& conv, const c10::optional<at::Tensor>& bias_in,
    int64_t block_elements) {
  const at::Tensor x = x_in.contiguous(), coeffs = optional_contiguous(coeffs_in), bias = optional_contiguous(bias_in);
  const at::Tensor guide = optional_contiguous(guide_in), guide_weight = optional_contiguous(guide_weight_in);
  const at::Tensor guide_bias = optional_contiguous(guide_bias_in);
  const std::vector<at::Tensor> weights = last_dim_contiguous(weights_in);
  const bool fused_guide = !guide.defined();
  TORCH_CHECK(!fused_guide || (guide_weight.defined() && conv[0] == 1 && conv[1] == 1 && conv[2] == 1 &&
                               conv[3] == 1 && conv[4] == 0 && conv[5] == 0),
              "blocked_forward: without a guided feature, a guide weight (m, C) and a pointwise layer");
  const Geometry g = fused_guide ? make_geometry(x, conv, x.size(2), x.size(3))
                                 : make_geometry(x, conv, guide.size(2), guide.size(3));
  const int64_t batch = g.batch, C = g.channels, T = g.taps(), P = g.positions(), HW = g.pixels();
  const int64_t regions = fused_guide ? guide_weight.size(0) : guide.size(1), O = weights[0].size(-2);
  const bool with_coeffs = coeffs.defined(), make_filters = with_coeffs && !stencils;
  const int64_t Q = with_coeffs ? coeffs.size(2) : 0;
  const int64_t K = with_coeffs && stencils ? Q * C : C * T;
  // with a guide weight, each block scores its own positions (the guide convolution of a pointwise layer is a
  // product with the block's input columns, already in cache) where a guided feature would be a pass through memory
  const at::Tensor mask = fused_guide ? at::empty({batch * P}, x.options().dtype(at::kLong)) : region_mask(guide);
  // rows per block: features and results of about block_elements, at least one row
  const int64_t rows_per_block = std::max<int64_t>(1, block_elements / ((K + O) * g.out_w));
  const int64_t blocks = (g.out_h + rows_per_block - 1) / rows_per_block;
  at::Tensor out = at::empty({batch, O, g.out_h, g.out_w}, x.options());
  int64_t* mask_p = mask.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "blocked_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gw = fused_guide ? guide_weight.data_ptr<scalar_t>() : nullptr;
    const scalar_t* gb = fused_guide && guide_bias.defined() ? guide_bias.data_ptr<scalar_t>() : nullptr;
    const scalar_t* a = with_coeffs ? coeffs.data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    auto run = [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> values, coefs, scores, best, filter_row, padded;
      // a region's (O, C) factor matrices (rows of C: weights from unbind), and one row of each
      std::vector<const scalar_t*> factor(Q), factor_row(Q);
      std::vector<int32_t> padded_order;
      Scratch<scalar_t> features, results, filters;  // each element written before it is read
      std::vector<int64_t> offsets(regions + 1);
      // order[i]: the block position of column i; column_of: its inverse. int32, so that gathers through them
      // vectorise (the scatter of results is a gather through column_of, with contiguous stores)
      std::vector<int32_t> order, column_of, sources;
      std::vector<char> made(regions);  // filters of sample `made_for` made so far, by region
      int64_t made_for = -1;
      for (int64_t job = begin; job < end; ++job) {
        const int64_t b = job / blocks, row_begin = (job % blocks) * rows_per_block;
        if (make_filters && made_for != b) {  // a thread's blocks of one sample share its filters
          filters.reserve(regions * O * C * T);
          std::fill(made.begin(), made.end(), 0);
          made_for = b;
        }
        const int64_t row_end = std::min(g.out_h, row_begin + rows_per_block);
        const int64_t p0 = row_begin * g.out_w, n = (row_end - row_begin) * g.out_w;
        int64_t* region = mask_p + b * P + p0;
        if (fused_guide) {  // scores (m, n) = guide weight (m, C) @ the block's columns of x (C, n), + bias
          scores.resize(regions * n);
          best.resize(n);
          gemm<scalar_t>(false, false, regions, n, C, gw, C, xp + b * C * HW + p0, HW, scalar_t(0), scores.data(), n);
          if (gb) {
            for (int64_t t = 0; t < regions; ++t) {
              for (int64_t i = 0; i < n; ++i) scores[t * n + i] += gb[t];
            }
          }
          argmax_regions(scores.data(), n, regions, n, best.data(), region);
        }
        // counting sort of the block's positions by region; order holds positions relative to p0
        std::fill(offsets.begin(), offsets.end(), 0);
        for (int64_t j = 0; j < n; ++j) offsets[region[j] + 1]++;
        for (int64_t t = 0; t < regions; ++t) offsets[t + 1] += offsets[t];
        order.resize(n);
        column_of.resize(n);
        {
          std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
          for (int64_t j = 0; j < n; ++j) {
            const int32_t column = static_cast<int32_t>(next[region[j]]++);
            order[column] = static_cast<int32_t>(j);
            column_of[j] = column;
          }
        }
        features.reserve(K * n);
        if (with_coeffs && stencils && g.sh == 1 && g.sw == 1) {
          // Stride 1: each channel copied into a zero-padded block of rows (row length Wp), the stencils computed at
          // every padded position of the block's output rows (Wp - out_w of them per row are never read), so that a
          // tap is one vector loop over the whole block instead of a short loop per row and tap.
          const int64_t Wp = g.width + 2 * g.pw, rows = row_end - row_begin, in_rows = rows + g.dh * (g.kh - 1);
          const int64_t np = rows * Wp;
          padded.resize(in_rows * Wp + Wp);  // a last row's taps read up to dw * (kw - 1) < Wp past its end
          std::fill(padded.begin(), padded.end(), scalar_t(0));
          coefs.assign(Q * T * np, scalar_t(0));
          padded_order.resize(n);
          for (int64_t j = 0; j < n; ++j) {
            const int64_t at = (j / g.out_w) * Wp + j % g.out_w;
            const scalar_t* coef = a + (b * regions + region[j]) * Q * T;
            for (int64_t k = 0; k < Q * T; ++k) coefs[k * np + at] = coef[k];
          }
          for (int64_t i = 0; i < n; ++i) {
            padded_order[i] = static_cast<int32_t>((order[i] / g.out_w) * Wp + order[i] % g.out_w);
          }
          values.resize(np);
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* channel = xp + (b * C + c) * HW;
            for (int64_t r = 0; r < in_rows; ++r) {  // padded row r is input row row_begin - ph + r
              const int64_t h = row_begin - g.ph + r;
              if (h >= 0 && h < g.height) std::copy(channel + h * g.width, channel + (h + 1) * g.width,
                                                    padded.data() + r * Wp + g.pw);
            }
            for (int64_t q = 0; q < Q; ++q) {
              std::fill(values.begin(), values.end(), scalar_t(0));
              for (int64_t tap = 0; tap < T; ++tap) {
                const int64_t shift = (tap / g.kw) * g.dh * Wp + (tap % g.kw) * g.dw;
                axpy_run<true>(values.data(), coefs.data() + (q * T + tap) * np, padded.data() + shift, np, 1);
              }
              gather(features.data() + (q * C + c) * n, values.data(), padded_order.data(), n, false);
            }
          }
        } else if (with_coeffs && stencils) {
          coefs.resize(Q * T * n);
          for (int64_t j = 0; j < n; ++j) {
            const scalar_t* coef = a + (b * regions + region[j]) * Q * T;
            for (int64_t k = 0; k < Q * T; ++k) coefs[k * n + j] = coef[k];
          }
          values.resize(n);
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* channel = xp + (b * C + c) * HW;
            for (int64_t q = 0; q < Q; ++q) {
              std::fill(values.begin(), values.end(), scalar_t(0));
              for_each_tap_run(g, [&](int64_t tap, int64_t first, int64_t source, int64_t count) {
                axpy_run<true>(values.data() + first - p0, coefs.data() + (q * T + tap) * n + first - p0,
                               channel + source, count, g.sw);
              }, row_begin, row_end);
              gather(features.data() + (q * C + c) * n, values.data(), order.data(), n, false);
            }
          }
        } else {
          // tap-major (sources[tap * n + i]), so that the gathers below read their indices contiguously
          sources.resize(n * T);
          std::vector<int32_t> taps(T);
          for (int64_t i = 0; i < n; ++i) {
            tap_sources(g, p0 + order[i], taps.data());
            for (int64_t tap = 0; tap < T; ++tap) sources[tap * n + i] = taps[tap];
          }
          const bool padded = g.ph > 0 || g.pw > 0;  // without padding every tap reads inside the image
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* channel = xp + (b * C + c) * HW;
            for (int64_t tap = 0; tap < T; ++tap) {
              scalar_t* row = features.data() + (c * T + tap) * n;
              gather(row, channel, sources.data() + tap * n, n, padded);
            }
          }
        }
        results.reserve(O * n);
        for (int64_t t = 0; t < regions; ++t) {
          const int64_t first = offsets[t], count = offsets[t + 1] - offsets[t];
          if (count == 0) continue;
          if (make_filters) {  // filter[o, c * T + tap] = sum_q coeffs[b, t, q, tap] * weights[q][t][o, c]
            for (int64_t q = 0; q < Q; ++q) factor[q] = matrix<scalar_t>(weights[q], t).data;
            const scalar_t* coef = a + (b * regions + t) * Q * T;
            if (count <= kSkinnyColumns && !made[t]) {
              // few columns (a small map at batch 1): each row of the filter made as it is used, in L1, so the
              // factors are read once and no filter goes out to memory and back
              filter_row.resize(C * T);
              auto row_of = [&](int64_t o) {
                for (int64_t q = 0; q < Q; ++q) factor_row[q] = factor[q] + o * C;
                make_filter(factor_row, coef, Q, T, C, filter_row.data());
                return static_cast<const scalar_t*>(filter_row.data());
              };
              skinny_gemm_rows(O, count, C * T, row_of, features.data() + first, n, scalar_t(0),
                               results.data() + first, n);
              continue;
            }
            scalar_t* filter = filters.data() + t * O * C * T;
            if (!made[t]) {
              make_filter(factor, coef, Q, T, O * C, filter);
              made[t] = 1;
            }
            gemm<scalar_t>(false, false, O, count, C * T, filter, C * T, features.data() + first, n, scalar_t(0),
                           results.data() + first, n);
            continue;
          }
          int64_t row = 0;
          for (size_t i = 0; i < weights.size(); ++i) {
            const Matrix<scalar_t> w = per_sample ? matrix<scalar_t>(weights[i], t, b) : matrix<scalar_t>(weights[i], t);
            const int64_t width = weights[i].size(-1);
            gemm<scalar_t>(false, false, O, count, width, w.data, w.stride, features.data() + row * n + first, n,
                           scalar_t(i == 0 ? 0 : 1), results.data() + first, n);
            row += width;
          }
        }
        for (int64_t o = 0; o < O; ++o) {
          const scalar_t add = bp ? bp[o] : scalar_t(0);
          gather(op + (b * O + o) * P + p0, results.data() + o * n, column_of.data(), n, false, add);
        }
      }
    };
    if (batch * blocks == 1) {
      run(0, 1);  // one block (small maps at batch 1): no parallel region to open
    } else {
      at::parallel_for(0, batch * blocks, 1, run);
    }
  });
  return {out, mask.view({batch, g.out_h, g.out_w})};
}

// DynamicFilterGenerator.factors of a 1x1 layer in one call, for forwards that nothing will differentiate (at batch
// 1 its ten torch calls cost more than their arithmetic): coefficients (B, m, Q + 1, 1), [s, 1] per region, with
// s = sigmoid(hidden_weight (H, C) @ the mean of x over its pixels + hidden_bias), H = m * Q, grouped Q per region.
at::Tensor pointwise_coefficients(const at::Tensor& x_in, const at::Tensor& hidden_weight_in,
                                  const c10::optional<at::Tensor>& hidden_bias_in, int64_t regions) {
  const at::Tensor x = x_in.contiguous(), weight = hidden_weight_in.contiguous();
  const at::Tensor hidden_bias = optional_contiguous(hidden_bias_in);
  const int64_t batch = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), H = weight.size(0), Q = H / regions;
  TORCH_CHECK(weight.size(1) == C && H % regions == 0, "pointwise_coefficients: hidden weight (m * Q, C)");
  at::Tensor coeffs = at::empty({batch, regions, Q + 1, 1}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pointwise_coefficients", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* hb = hidden_bias.defined() ? hidden_bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* out = coeffs.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> pooled(C);
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* channel = xp + (b * C + c) * HW;
          pooled[c] = static_cast<double>(sum_of(channel, HW)) / static_cast<double>(HW);
        }
        for (int64_t h = 0; h < H; ++h) {
          double value = hb ? static_cast<double>(hb[h]) : 0.0;
          for (int64_t c = 0; c < C; ++c) value += static_cast<double>(w[h * C + c]) * pooled[c];
          const int64_t t = h / Q, q = h % Q;
          out[(b * regions + t) * (Q + 1) + q] = static_cast<scalar_t>(1.0 / (1.0 + std::exp(-value)));
        }
        for (int64_t t = 0; t < regions; ++t) out[(b * regions + t) * (Q + 1) + Q] = scalar_t(1);
      }
    });
  });
  return coeffs;
}

// The adjoint of bucket_matmul: (grad of features, grads of weights...); each is computed when asked.
std::vector<at::Tensor> bucket_matmul_backward(const at::Tensor& grad, const at::Tensor& features,
                                               const at::Tensor& offsets, const std::vector<at::Tensor>& weights_in,
                                               int64_t regions, bool per_sample, bool need_features,
                                               bool need_weights) {
  const std::vector<at::Tensor> weights = last_dim_contiguous(weights_in);
  const int64_t O = weights[0].size(-2), N = features.size(1);
  // Every column belongs to one GEMM, which writes its features' gradient whole, and every GEMM writes its weight
  // matrix's gradient whole; only the matrices of GEMMs without columns are zeroed (below).
  at::Tensor grad_features = need_features ? at::empty_like(features) : at::Tensor();
  std::vector<at::Tensor> grad_weights;
  for (const auto& w : weights) grad_weights.push_back(need_weights ? at::empty(w.sizes(), w.options()) : at::Tensor());
  if (need_weights) {
    const int64_t segments = offsets.size(0) - 1, batch = segments / regions;
    const int64_t* off = offsets.data_ptr<int64_t>();
    for (int64_t t = 0; t < regions; ++t) {
      for (int64_t b = 0; b < batch; ++b) {
        const bool empty = per_sample ? off[t * batch + b + 1] == off[t * batch + b]
                                      : off[(t + 1) * batch] == off[t * batch];
        if (!empty) continue;
        for (auto& w : grad_weights) (per_sample ? w[t][b] : w[t]).zero_();
        if (!per_sample) break;
      }
    }
  }
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "bucket_matmul_backward", [&] {
    const scalar_t* f = features.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    for_each_gemm<scalar_t>(offsets, regions, per_sample, [&](auto select, int64_t first, int64_t count) {
      int64_t row = 0;
      for (size_t i = 0; i < weights.size(); ++i) {
        const Matrix<scalar_t> w = select(weights[i]);
        const int64_t width = weights[i].size(-1);
        if (need_features) {
          gemm<scalar_t>(true, false, width, count, O, w.data, w.stride, g + first, N, scalar_t(0),
                         grad_features.data_ptr<scalar_t>() + row * N + first, N);
        }
        if (need_weights) {
          const Matrix<scalar_t> into = select(grad_weights[i]);
          gemm<scalar_t>(false, true, O, width, count, g + first, N, f + row * N + first, N, scalar_t(0),
                         const_cast<scalar_t*>(into.data), into.stride);
        }
        row += width;
      }
    });
  });
  std::vector<at::Tensor> result{grad_features};
  result.insert(result.end(), grad_weights.begin(), grad_weights.end());
  return result;
}

// out (O, N): each segment's columns of patch features (C * taps, N) times the filter of its sample and region,
// made in the thread that multiplies by it from the factors, filter[o, c * taps + tap] =
// sum_q coeffs[b, t, q, tap] * weights[q][t][o, c]; so no (B, m, O, C * taps) tensor exists. Segments run side by
// side, one thread each.
at::Tensor factored_filter_matmul(const at::Tensor& features, const at::Tensor& offsets, const at::Tensor& coeffs_in,
                                  const std::vector<at::Tensor>& weights_in) {
  const at::Tensor coeffs = coeffs_in.contiguous();
  std::vector<at::Tensor> weights;
  for (const auto& w : weights_in) weights.push_back(w.contiguous());
  const int64_t batch = coeffs.size(0), regions = coeffs.size(1), Q = coeffs.size(2), T = coeffs.size(3);
  const int64_t O = weights[0].size(1), C = weights[0].size(2), N = features.size(1);
  at::Tensor out = at::empty({O, N}, features.options());
  const int64_t* off = offsets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "factored_filter_matmul", [&] {
    const scalar_t* a = coeffs.data_ptr<scalar_t>();
    const scalar_t* feats = features.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for_each_segment(regions * batch, [&](int64_t s) {
      const int64_t first = off[s], count = off[s + 1] - off[s], t = s / batch, b = s % batch;
      if (count == 0) return;
      std::vector<scalar_t> filter(O * C * T);
      const scalar_t* coef = a + (b * regions + t) * Q * T;
      std::vector<const scalar_t*> w(Q);
      for (int64_t q = 0; q < Q; ++q) w[q] = weights[q].data_ptr<scalar_t>() + t * O * C;
      make_filter(w, coef, Q, T, O * C, filter.data());
      gemm<scalar_t>(false, false, O, count, C * T, filter.data(), C * T, feats + first, N, scalar_t(0), o + first, N);
    });
  });
  return out;
}

// Columns (O, N) into out (B, O, H', W') (contiguous, written whole), plus a per-channel bias when defined. A
// (sample, channel) pair owns its output row and fills it from each region's segment while the row is in cache.
void scatter_columns(const at::Tensor& columns, const at::Tensor& order, const at::Tensor& offsets, at::Tensor& out,
                     const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(out.is_contiguous(), "scatter_columns: out must be contiguous");
  const at::Tensor bias = optional_contiguous(bias_in);
  const int64_t batch = out.size(0), O = out.size(1), P = out.size(2) * out.size(3), N = columns.size(1);
  const int64_t regions = (offsets.size(0) - 1) / batch;
  const int64_t* order_p = order.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(columns.scalar_type(), "scatter_columns", [&] {
    const scalar_t* from = columns.data_ptr<scalar_t>();
    scalar_t* to = out.data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, batch * O, 1, [&](int64_t begin, int64_t end) {
      for (int64_t job = begin; job < end; ++job) {
        const int64_t b = job / O, o = job % O;
        const scalar_t add = bp ? bp[o] : scalar_t(0);
        const scalar_t* row = from + o * N;
        scalar_t* channel = to + job * P;
        for_each_column(off, order_p, regions, batch, b, [&](int64_t n, int64_t p) { channel[p] = row[n] + add; });
      }
    });
  });
}

// The reverse, for gradients: (B, O, H', W') -> columns (O, N).
at::Tensor gather_columns(const at::Tensor& grad_in, const at::Tensor& order, const at::Tensor& offsets) {
  const at::Tensor grad = grad_in.contiguous();
  const int64_t batch = grad.size(0), O = grad.size(1), P = grad.size(2) * grad.size(3), N = order.size(0);
  const int64_t regions = (offsets.size(0) - 1) / batch;
  at::Tensor columns = at::empty({O, N}, grad.options());
  const int64_t* order_p = order.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "gather_columns", [&] {
    const scalar_t* from = grad.data_ptr<scalar_t>();
    scalar_t* to = columns.data_ptr<scalar_t>();
    at::parallel_for(0, batch * O, 1, [&](int64_t begin, int64_t end) {
      for (int64_t job = begin; job < end; ++job) {
        const int64_t b = job / O, o = job % O;
        const scalar_t* channel = from + job * P;
        scalar_t* row = to + o * N;
        for_each_column(off, order_p, regions, batch, b, [&](int64_t n, int64_t p) { row[n] = channel[p]; });
      }
    });
  });
  return columns;
}

// The adjoint of gather_features with respect to x, NCHW. A (sample, channel) pair owns its gradient row, so taps
// that overlap never race and the sums do not depend on the thread count.
at::Tensor features_backward_input(const at::Tensor& grad_features, const at::Tensor& x, const at::Tensor& mask,
                                   const at::Tensor& order, const at::Tensor& offsets,
                                   const c10::optional<at::Tensor>& coeffs_in, const std::vector<int64_t>& conv,
                                   int64_t out_h, int64_t out_w) {
  const Geometry g = make_geometry(x, conv, out_h, out_w);
  const at::Tensor coeffs = optional_contiguous(coeffs_in);
  const bool stencils = coeffs.defined();
  const int64_t C = g.channels, T = g.taps(), HW = g.pixels(), P = g.positions(), N = order.size(0);
  const int64_t batch = g.batch, Q = stencils ? coeffs.size(2) : 0, regions = (offsets.size(0) - 1) / batch;
  const at::Tensor sources = stencils ? at::Tensor() : column_sources(g, order);
  at::Tensor grad = at::zeros({batch, C, g.height, g.width}, x.options());
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* order_p = order.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "features_backward_input", [&] {
    const scalar_t* gf = grad_features.data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    if (!stencils) {
      for_each_patch_element(g, sources.data_ptr<int32_t>(), off, order_p, regions,
                             [&](int64_t b, int64_t c, int64_t tap, int64_t n, int32_t to) {
        if (to >= 0) out[(b * C + c) * HW + to] += gf[(c * T + tap) * N + n];
      });
      return;
    }
    const int64_t stride = g.sw;
    for_each_stencil_row(g, coeffs.data_ptr<scalar_t>(), regions, Q, mask.data_ptr<int64_t>(),
                         [&](int64_t b, int64_t c, int64_t q, const scalar_t* coefs, scalar_t* values) {
      const scalar_t* row = gf + (q * C + c) * N;
      for_each_column(off, order_p, regions, batch, b, [&](int64_t n, int64_t p) { values[p] = row[n]; });
      scalar_t* channel = out + (b * C + c) * HW;
      for_each_tap_run(g, [&](int64_t tap, int64_t first, int64_t source, int64_t count) {
        const scalar_t* weight = coefs + tap * P + first;
        const scalar_t* from = values + first;
        scalar_t* to = channel + source;
        if (stride == 1) {
          axpy_run<true>(to, weight, from, count, 1);
        } else {
          for (int64_t k = 0; k < count; ++k) to[k * stride] += weight[k] * from[k];
        }
      });
    });
  });
  return grad.contiguous(x.suggest_memory_format());
}

// The gradient of the stencil coefficients (B, m, Q, taps): for each position, sum_c of its feature gradient in
// row (q, c) times x at the tap, summed into the position's region. A sample owns its coefficients.
at::Tensor features_backward_coeffs(const at::Tensor& grad_features, const at::Tensor& x_in, const at::Tensor& mask,
                                    const at::Tensor& order, const at::Tensor& offsets, int64_t Q,
                                    const std::vector<int64_t>& conv, int64_t out_h, int64_t out_w) {
  const at::Tensor x = x_in.contiguous();
  const Geometry g = make_geometry(x, conv, out_h, out_w);
  const int64_t C = g.channels, T = g.taps(), HW = g.pixels(), P = g.positions(), N = order.size(0);
  const int64_t batch = g.batch, regions = (offsets.size(0) - 1) / batch;
  at::Tensor grad = at::zeros({batch, regions, Q, T}, x.options());
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* order_p = order.data_ptr<int64_t>();
  const int64_t* mask_p = mask.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "features_backward_coeffs", [&] {
    const scalar_t* gf = grad_features.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> values(P), sums(Q * T * P);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(sums.begin(), sums.end(), scalar_t(0));
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* channel = xp + (b * C + c) * HW;
          for (int64_t q = 0; q < Q; ++q) {
            const scalar_t* row = gf + (q * C + c) * N;
            for_each_column(off, order_p, regions, batch, b, [&](int64_t n, int64_t p) { values[p] = row[n]; });
            const int64_t stride = g.sw;
            for_each_tap_run(g, [&](int64_t tap, int64_t first, int64_t source, int64_t count) {
              scalar_t* sum = sums.data() + (q * T + tap) * P + first;
              const scalar_t* from = channel + source;
              const scalar_t* value = values.data() + first;
              axpy_run<true>(sum, value, from, count, stride);
            });
          }
        }
        for (int64_t p = 0; p < P; ++p) {
          scalar_t* coef = out + (b * regions + mask_p[b * P + p]) * Q * T;
          for (int64_t k = 0; k < Q * T; ++k) coef[k] += sums[k * P + p];
        }
      }
    });
  });
  return grad;
}

// g of Eq. 7 for a pointwise layer (1x1, stride 1, no padding) with per-sample filters (m, B, O, C), (B, m, P): for
// every region j at every position, sum_o grad_out[o, p] * (filter j @ x[:, p])[o], or, when C < O, the same as
// sum_c x[c, p] * (filter j^T @ grad_out[:, p])[c]. A sample's positions a block at a time, one region's product
// and its reduction while the block is in cache: m convolutions of multiply-adds and no (m * O, P) tensor. A sample
// owns its scores.
at::Tensor pointwise_region_scores(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& filters_in) {
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous();
  const at::Tensor filters = filters_in.stride(-1) == 1 ? filters_in : filters_in.contiguous();
  const int64_t regions = filters.size(0), batch = filters.size(1), O = filters.size(2), C = filters.size(3);
  const int64_t P = x.size(2) * x.size(3);
  TORCH_CHECK(grad.size(1) == O && x.size(1) == C && grad.size(2) * grad.size(3) == P,
              "pointwise_region_scores: grad_out (B, O, H, W), x (B, C, H, W), filters (m, B, O, C)");
  at::Tensor scores = at::empty({batch, regions, P}, x.options());
  const bool by_outputs = O <= C;  // multiply the narrower side
  const int64_t rows = by_outputs ? O : C, block = std::max<int64_t>(16, (1 << 16) / rows);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pointwise_region_scores", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* out = scores.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> product(rows * block);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* gb = g + b * O * P;
        const scalar_t* xb = xp + b * C * P;
        for (int64_t p0 = 0; p0 < P; p0 += block) {
          const int64_t n = std::min(block, P - p0);
          for (int64_t t = 0; t < regions; ++t) {
            const Matrix<scalar_t> f = matrix<scalar_t>(filters, t, b);  // (O, C)
            const scalar_t* other = by_outputs ? gb + p0 : xb + p0;      // what the product is dotted with
            if (by_outputs) {
              gemm<scalar_t>(false, false, O, n, C, f.data, f.stride, xb + p0, P, scalar_t(0), product.data(), n);
            } else {
              gemm<scalar_t>(true, false, C, n, O, f.data, f.stride, gb + p0, P, scalar_t(0), product.data(), n);
            }
            scalar_t* score = out + (b * regions + t) * P + p0;
            std::fill(score, score + n, scalar_t(0));
            for (int64_t r = 0; r < rows; ++r) {
              axpy_run<true>(score, product.data() + r * n, other + r * P, n, 1);
            }
          }
        }
      }
    });
  });
  return scores;
}

// g of Eq. 7 for stencil filters, (B, m, H', W'): for every region j at every position,
// sum_q <weights[q][j]^T grad_out, sum_tap coeffs[b, j, q, tap] * x at the tap>. The back-projections of all
// (j, q) are one GEMM of stacked (m * Q * C, O) weights against grad_out's columns, a group of samples at a time;
// the stencils, with region j's coefficients of the sample, are dense over each channel. A sample owns its scores.
at::Tensor stencil_region_scores(const at::Tensor& grad_in, const at::Tensor& stacked_in, const at::Tensor& x_in,
                                 const at::Tensor& coeffs_in, const std::vector<int64_t>& conv) {
  const at::Tensor x = x_in.contiguous(), coeffs = coeffs_in.contiguous(), grad = grad_in.contiguous();
  const at::Tensor stacked = stacked_in.contiguous();
  const Geometry g = make_geometry(x, conv, grad.size(2), grad.size(3));
  const int64_t C = g.channels, T = g.taps(), P = g.positions(), HW = g.pixels(), batch = g.batch;
  const int64_t regions = coeffs.size(1), Q = coeffs.size(2), O = grad.size(1);
  const bool pointwise = T == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0;
  at::Tensor scores = at::empty({batch, regions, g.out_h, g.out_w}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stencil_region_scores", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* a = coeffs.data_ptr<scalar_t>();
    scalar_t* out = scores.data_ptr<scalar_t>();
    const scalar_t* st = stacked.data_ptr<scalar_t>();
    const int64_t rows = stacked.size(0);
    // Samples go through the GEMM together, at least kColumns positions at once: small maps (training at 32px)
    // would otherwise make it a string of skinny products.
    constexpr int64_t kColumns = 256;
    const int64_t group = std::min(batch, (kColumns + P - 1) / P);
    for (int64_t first = 0; first < batch; first += group) {
      const int64_t count = std::min(group, batch - first), width = count * P;
      const at::Tensor columns = grad.narrow(0, first, count).permute({1, 0, 2, 3}).reshape({O, width});
      std::vector<scalar_t> back(rows * width);
      gemm<scalar_t>(false, false, rows, width, O, st, O, columns.data_ptr<scalar_t>(), width, scalar_t(0),
                     back.data(), width);
      at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> values(P);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = first + i;
          scalar_t* sums = out + b * regions * P;
          std::fill(sums, sums + regions * P, scalar_t(0));
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* channel = xp + (b * C + c) * HW;
            for (int64_t j = 0; j < regions; ++j) {
              for (int64_t q = 0; q < Q; ++q) {
                const scalar_t* coef = a + ((b * regions + j) * Q + q) * T;
                const scalar_t* row = back.data() + ((j * Q + q) * C + c) * width + i * P;
                scalar_t* sum = sums + j * P;
                if (pointwise) {  // the stencil is the channel times one coefficient
                  const scalar_t scale = coef[0];
                  for (int64_t p = 0; p < P; ++p) sum[p] += scale * row[p] * channel[p];
                  continue;
                }
                stencil<false>(g, channel, coef, values.data());
                for (int64_t p = 0; p < P; ++p) sum[p] += row[p] * values[p];
              }
            }
          }
        }
      });
    }
  });
  return scores;
}

// Which BLAS the products call, as result records describe it.
std::string blas() {
#ifdef DRBENCH_OPENBLAS
  return std::string("OpenBLAS (scipy-openblas32, ") + scipy_openblas_get_corename() +
         " kernels), one thread per share of a product";
#else
  return "torch's BLAS (MKL on x86)";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef DRBENCH_OPENBLAS
  scipy_openblas_set_num_threads(1);  // our loops own the threads
#endif
  m.def("blas", &blas);
  m.def("route", &route);
  m.def("gather_features", &gather_features);
  m.def("bucket_matmul", &bucket_matmul);
  m.def("blocked_forward", &blocked_forward);
  m.def("pointwise_coefficients", &pointwise_coefficients);
  m.def("bucket_matmul_backward", &bucket_matmul_backward);
  m.def("factored_filter_matmul", &factored_filter_matmul);
  m.def("scatter_columns", &scatter_columns);
  m.def("gather_columns", &gather_columns);
  m.def("features_backward_input", &features_backward_input);
  m.def("features_backward_coeffs", &features_backward_coeffs);
  m.def("stencil_region_scores", &stencil_region_scores);
  m.def("pointwise_region_scores", &pointwise_region_scores);
}
