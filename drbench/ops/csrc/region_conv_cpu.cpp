// CPU kernels of drbench's compiled region convolution (drbench/ops/region_conv_cpu.py holds the maths and the
// autograd wiring; this file only moves memory and calls ATen's GEMMs).
//
// Output positions are routed to buckets (a region, or a (sample, region) pair) by a counting sort; each bucket's
// rows of features are gathered straight from the input, multiplied by its weights in one GEMM per weight term,
// and scattered back. Features of a row ("phi", K values) are either
//   - patches (im2col, filter order [c][tap]) when no coefficients are given, or
//   - coefficient stencils: block q holds sum_tap coeffs[b, t, q, tap] * x[b, :, tap], block-major ([q][c]).
// Every loop that writes memory owns what it writes (rows, samples), so results do not depend on the thread count.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

struct Geometry {
  int64_t batch, channels, height, width;  // input
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;  // kernel, stride, padding, dilation
  int64_t out_h, out_w;

  int64_t taps() const { return kh * kw; }
  int64_t positions() const { return out_h * out_w; }
};

Geometry make_geometry(const at::Tensor& x, std::vector<int64_t> conv, int64_t out_h, int64_t out_w) {
  TORCH_CHECK(conv.size() == 8, "conv args: kh, kw, sh, sw, ph, pw, dh, dw");
  return {x.size(0), x.size(1), x.size(2), x.size(3), conv[0], conv[1], conv[2], conv[3],
          conv[4], conv[5], conv[6], conv[7], out_h, out_w};
}

// The input in channels-last order, (B, H, W, C) contiguous: a feature row reads contiguous channel vectors.
at::Tensor channels_last(const at::Tensor& x) { return x.permute({0, 2, 3, 1}).contiguous(); }

// Calls fn(tap, h, w) for each kernel tap of output position p whose input pixel lies inside the image.
template <typename F>
inline void for_each_tap(const Geometry& g, int64_t p, F fn) {
  const int64_t ho = p / g.out_w, wo = p % g.out_w;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t h = ho * g.sh - g.ph + i * g.dh;
    if (h < 0 || h >= g.height) continue;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t w = wo * g.sw - g.pw + j * g.dw;
      if (w < 0 || w >= g.width) continue;
      fn(i * g.kw + j, h, w);
    }
  }
}

}  // namespace

// Region of each position (argmax over dim 1, ties to the lowest index, NaN wins like torch.argmax) and the
// positions ordered by bucket (stable: by sample, then position). Returns (mask (B*P), order (N), inverse (B*P),
// offsets (buckets + 1)); a bucket is the region, or sample * m + region when per_sample.
std::vector<at::Tensor> route(const at::Tensor& guide_in, bool per_sample) {
  TORCH_CHECK(guide_in.dim() == 4, "guide must be (B, m, H', W')");
  const at::Tensor guide = guide_in.contiguous();
  const int64_t batch = guide.size(0), regions = guide.size(1), positions = guide.size(2) * guide.size(3);
  const int64_t total = batch * positions, buckets = per_sample ? batch * regions : regions;
  auto long_options = guide.options().dtype(at::kLong);
  at::Tensor mask = at::empty({total}, long_options);
  int64_t* mask_p = mask.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(guide.scalar_type(), "route", [&] {
    const scalar_t* g = guide.data_ptr<scalar_t>();
    at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t b = n / positions, p = n % positions;
        const scalar_t* v = g + b * regions * positions + p;
        int64_t best = 0;
        scalar_t best_value = v[0];
        for (int64_t t = 1; t < regions && !std::isnan(best_value); ++t) {
          const scalar_t value = v[t * positions];
          if (value > best_value || std::isnan(value)) {
            best = t;
            best_value = value;
          }
        }
        mask_p[n] = best;
      }
    });
  });
  at::Tensor offsets = at::zeros({buckets + 1}, long_options);
  int64_t* off = offsets.data_ptr<int64_t>();
  auto bucket_of = [&](int64_t n) { return per_sample ? (n / positions) * regions + mask_p[n] : mask_p[n]; };
  for (int64_t n = 0; n < total; ++n) off[bucket_of(n) + 1]++;
  for (int64_t k = 0; k < buckets; ++k) off[k + 1] += off[k];
  at::Tensor order = at::empty({total}, long_options), inverse = at::empty({total}, long_options);
  int64_t* order_p = order.data_ptr<int64_t>();
  int64_t* inverse_p = inverse.data_ptr<int64_t>();
  std::vector<int64_t> next(off, off + buckets);
  for (int64_t n = 0; n < total; ++n) {
    const int64_t row = next[bucket_of(n)]++;
    order_p[row] = n;
    inverse_p[n] = row;
  }
  return {mask, order, inverse, offsets};
}

// Feature rows in bucket order: (N, C * taps) patches, or (N, Q * C) coefficient stencils when coeffs
// (B, m, Q, taps) is defined.
at::Tensor gather_features(const at::Tensor& x, const at::Tensor& order, const at::Tensor& mask,
                           const c10::optional<at::Tensor>& coeffs_in, std::vector<int64_t> conv, int64_t out_h,
                           int64_t out_w) {
  const Geometry g = make_geometry(x, conv, out_h, out_w);
  const at::Tensor xc = channels_last(x);
  const int64_t rows = order.size(0), C = g.channels, T = g.taps(), P = g.positions();
  const bool stencil = coeffs_in.has_value() && coeffs_in->defined();
  const at::Tensor coeffs = stencil ? coeffs_in->contiguous() : at::Tensor();
  const int64_t Q = stencil ? coeffs.size(2) : 0, regions = stencil ? coeffs.size(1) : 0;
  const int64_t K = stencil ? Q * C : C * T;
  at::Tensor phi = at::empty({rows, K}, x.options());
  const int64_t* order_p = order.data_ptr<int64_t>();
  const int64_t* mask_p = mask.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gather_features", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* out = phi.data_ptr<scalar_t>();
    const scalar_t* a = stencil ? coeffs.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t pos = order_p[n], b = pos / P, p = pos % P;
        scalar_t* row = out + n * K;
        std::fill(row, row + K, scalar_t(0));
        const scalar_t* sample = xp + b * g.height * g.width * C;
        if (stencil) {
          const scalar_t* coef = a + (b * regions + mask_p[pos]) * Q * T;
          for_each_tap(g, p, [&](int64_t tap, int64_t h, int64_t w) {
            const scalar_t* pixel = sample + (h * g.width + w) * C;
            for (int64_t q = 0; q < Q; ++q) {
              const scalar_t s = coef[q * T + tap];
              scalar_t* block = row + q * C;
_Pragma("omp simd")
              for (int64_t c = 0; c < C; ++c) block[c] += s * pixel[c];
            }
          });
        } else {
          for_each_tap(g, p, [&](int64_t tap, int64_t h, int64_t w) {
            const scalar_t* pixel = sample + (h * g.width + w) * C;
            for (int64_t c = 0; c < C; ++c) row[c * T + tap] = pixel[c];
          });
        }
      }
    });
  });
  return phi;
}

// rows (N, O) in bucket order = sum_i features[:, block i] @ weights[i][bucket]^T, for each bucket's rows.
// weights[i] is (buckets, O, K_i); the blocks are consecutive columns of features. Buckets run one after the
// other with threaded GEMMs when they are few and large (regions), side by side with one thread each when they
// are many (sample-region pairs).
at::Tensor bucket_matmul(const at::Tensor& features, const at::Tensor& offsets, const std::vector<at::Tensor>& weights) {
  const int64_t buckets = offsets.size(0) - 1, out_channels = weights[0].size(1);
  at::Tensor rows = at::empty({features.size(0), out_channels}, features.options());
  const int64_t* off = offsets.data_ptr<int64_t>();
  auto one_bucket = [&](int64_t k) {
    at::NoGradGuard no_grad;  // in every thread: the GEMMs write into given outputs, autograd is the caller's
    const int64_t first = off[k], count = off[k + 1] - off[k];
    if (count == 0) return;
    at::Tensor out = rows.narrow(0, first, count);
    int64_t column = 0;
    for (size_t i = 0; i < weights.size(); ++i) {
      const int64_t width = weights[i].size(2);
      at::Tensor block = features.narrow(0, first, count).narrow(1, column, width);
      if (i == 0) {
        at::mm_out(out, block, weights[i][k].t());
      } else {
        out.addmm_(block, weights[i][k].t());
      }
      column += width;
    }
  };
  if (buckets >= 4 * at::get_num_threads()) {
    at::parallel_for(0, buckets, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) one_bucket(k);
    });
  } else {
    for (int64_t k = 0; k < buckets; ++k) one_bucket(k);
  }
  return rows;
}

// The adjoint of bucket_matmul: (grad of features, grads of weights); each is computed when asked.
std::vector<at::Tensor> bucket_matmul_backward(const at::Tensor& grad_rows, const at::Tensor& features,
                                               const at::Tensor& offsets, const std::vector<at::Tensor>& weights,
                                               bool need_features, bool need_weights) {
  const int64_t buckets = offsets.size(0) - 1;
  const int64_t* off = offsets.data_ptr<int64_t>();
  at::Tensor grad_features = need_features ? at::empty_like(features) : at::Tensor();
  std::vector<at::Tensor> grad_weights;
  for (const auto& w : weights) grad_weights.push_back(need_weights ? at::zeros(w.sizes(), w.options()) : at::Tensor());
  auto one_bucket = [&](int64_t k) {
    at::NoGradGuard no_grad;  // in every thread: the GEMMs write into given outputs, autograd is the caller's
    const int64_t first = off[k], count = off[k + 1] - off[k];
    if (count == 0) return;  // an empty bucket's weights keep a zero gradient
    at::Tensor grad = grad_rows.narrow(0, first, count);
    int64_t column = 0;
    for (size_t i = 0; i < weights.size(); ++i) {
      const int64_t width = weights[i].size(2);
      if (need_features) {
        at::Tensor into = grad_features.narrow(0, first, count).narrow(1, column, width);
        at::mm_out(into, grad, weights[i][k]);
      }
      if (need_weights) {
        at::Tensor into = grad_weights[i][k];
        at::mm_out(into, grad.t(), features.narrow(0, first, count).narrow(1, column, width));
      }
      column += width;
    }
  };
  if (buckets >= 4 * at::get_num_threads()) {
    at::parallel_for(0, buckets, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) one_bucket(k);
    });
  } else {
    for (int64_t k = 0; k < buckets; ++k) one_bucket(k);
  }
  std::vector<at::Tensor> result{grad_features};
  result.insert(result.end(), grad_weights.begin(), grad_weights.end());
  return result;
}

// Rows (N, O) in bucket order to (B, O, H', W') in position order, plus a per-channel bias when defined; and the
// reverse for gradients. Both go through blocks of positions so that reads and writes stay in cache.
constexpr int64_t kBlock = 16;

// out: (B, O, H', W') contiguous, written whole.
void scatter_rows(const at::Tensor& rows, const at::Tensor& inverse, at::Tensor& out,
                  const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(out.is_contiguous(), "scatter_rows: out must be contiguous");
  const int64_t batch = out.size(0), O = rows.size(1), P = out.size(2) * out.size(3);
  const int64_t blocks = (P + kBlock - 1) / kBlock;
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const int64_t* inv = inverse.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "scatter_rows", [&] {
    const scalar_t* src = rows.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? bias.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
      const scalar_t* from[kBlock];
      for (int64_t job = begin; job < end; ++job) {
        const int64_t b = job / blocks, p0 = (job % blocks) * kBlock, count = std::min(kBlock, P - p0);
        for (int64_t i = 0; i < count; ++i) from[i] = src + inv[b * P + p0 + i] * O;
        scalar_t* base = dst + b * O * P + p0;
        for (int64_t o = 0; o < O; ++o) {
          const scalar_t add = has_bias ? bp[o] : scalar_t(0);
          for (int64_t i = 0; i < count; ++i) base[o * P + i] = from[i][o] + add;
        }
      }
    });
  });
}

at::Tensor gather_rows(const at::Tensor& grad_in, const at::Tensor& inverse) {
  const at::Tensor grad = grad_in.contiguous();
  const int64_t batch = grad.size(0), O = grad.size(1), P = grad.size(2) * grad.size(3);
  const int64_t blocks = (P + kBlock - 1) / kBlock;
  at::Tensor rows = at::empty({batch * P, O}, grad.options());
  const int64_t* inv = inverse.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "gather_rows", [&] {
    const scalar_t* src = grad.data_ptr<scalar_t>();
    scalar_t* dst = rows.data_ptr<scalar_t>();
    at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
      scalar_t* to[kBlock];
      for (int64_t job = begin; job < end; ++job) {
        const int64_t b = job / blocks, p0 = (job % blocks) * kBlock, count = std::min(kBlock, P - p0);
        for (int64_t i = 0; i < count; ++i) to[i] = dst + inv[b * P + p0 + i] * O;
        const scalar_t* base = src + b * O * P + p0;
        for (int64_t o = 0; o < O; ++o) {
          for (int64_t i = 0; i < count; ++i) to[i][o] = base[o * P + i];
        }
      }
    });
  });
  return rows;
}

// The adjoint of gather_features with respect to x: each sample's gradient is summed by one thread (its rows'
// taps overlap), so the result does not depend on the thread count. Returned in x's memory format.
at::Tensor features_backward_input(const at::Tensor& grad_features, const at::Tensor& x, const at::Tensor& inverse,
                                   const at::Tensor& mask, const c10::optional<at::Tensor>& coeffs_in,
                                   std::vector<int64_t> conv, int64_t out_h, int64_t out_w) {
  const Geometry g = make_geometry(x, conv, out_h, out_w);
  const int64_t C = g.channels, T = g.taps(), P = g.positions(), K = grad_features.size(1);
  const bool stencil = coeffs_in.has_value() && coeffs_in->defined();
  const at::Tensor coeffs = stencil ? coeffs_in->contiguous() : at::Tensor();
  const int64_t Q = stencil ? coeffs.size(2) : 0, regions = stencil ? coeffs.size(1) : 0;
  at::Tensor grad_cl = at::zeros({g.batch, g.height, g.width, C}, x.options());
  const int64_t* inv = inverse.data_ptr<int64_t>();
  const int64_t* mask_p = mask.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "features_backward_input", [&] {
    const scalar_t* gf = grad_features.data_ptr<scalar_t>();
    scalar_t* out = grad_cl.data_ptr<scalar_t>();
    const scalar_t* a = stencil ? coeffs.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        scalar_t* sample = out + b * g.height * g.width * C;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t pos = b * P + p;
          const scalar_t* row = gf + inv[pos] * K;
          const scalar_t* coef = stencil ? a + (b * regions + mask_p[pos]) * Q * T : nullptr;
          for_each_tap(g, p, [&](int64_t tap, int64_t h, int64_t w) {
            scalar_t* pixel = sample + (h * g.width + w) * C;
            if (stencil) {
              for (int64_t q = 0; q < Q; ++q) {
                const scalar_t s = coef[q * T + tap];
                const scalar_t* block = row + q * C;
_Pragma("omp simd")
                for (int64_t c = 0; c < C; ++c) pixel[c] += s * block[c];
              }
            } else {
              for (int64_t c = 0; c < C; ++c) pixel[c] += row[c * T + tap];
            }
          });
        }
      }
    });
  });
  return grad_cl.permute({0, 3, 1, 2}).contiguous(x.suggest_memory_format());
}

// The gradient of the stencil coefficients (B, m, Q, taps): sum over a sample's positions in region t of
// <grad of block q, x at the tap>. One thread per sample.
at::Tensor features_backward_coeffs(const at::Tensor& grad_features, const at::Tensor& x, const at::Tensor& inverse,
                                    const at::Tensor& mask, int64_t regions, int64_t Q, std::vector<int64_t> conv,
                                    int64_t out_h, int64_t out_w) {
  const Geometry g = make_geometry(x, conv, out_h, out_w);
  const at::Tensor xc = channels_last(x);
  const int64_t C = g.channels, T = g.taps(), P = g.positions(), K = grad_features.size(1);
  at::Tensor grad = at::zeros({g.batch, regions, Q, T}, x.options());
  const int64_t* inv = inverse.data_ptr<int64_t>();
  const int64_t* mask_p = mask.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "features_backward_coeffs", [&] {
    const scalar_t* gf = grad_features.data_ptr<scalar_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* sample = xp + b * g.height * g.width * C;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t pos = b * P + p;
          const scalar_t* row = gf + inv[pos] * K;
          scalar_t* coef = out + (b * regions + mask_p[pos]) * Q * T;
          for_each_tap(g, p, [&](int64_t tap, int64_t h, int64_t w) {
            const scalar_t* pixel = sample + (h * g.width + w) * C;
            for (int64_t q = 0; q < Q; ++q) {
              const scalar_t* block = row + q * C;
              scalar_t sum = 0;
_Pragma("omp simd reduction(+ : sum)")
              for (int64_t c = 0; c < C; ++c) sum += block[c] * pixel[c];
              coef[q * T + tap] += sum;
            }
          });
        }
      }
    });
  });
  return grad;
}

// g of Eq. 7 for coefficient-stencil filters, (B, m, H', W'): for every region j at every position,
// sum_q sum_tap coeffs[b, j, q, tap] * <W[j, q]^T grad_out, x at the tap>. W^T grad_out for all (j, q) is one GEMM
// of the rows against stacked (O, m * Q * C) weights, a chunk of rows at a time.
at::Tensor stencil_region_scores(const at::Tensor& grad_rows, const at::Tensor& stacked, const at::Tensor& x,
                                 const at::Tensor& order, const at::Tensor& coeffs_in, std::vector<int64_t> conv,
                                 int64_t out_h, int64_t out_w, int64_t chunk_rows) {
  const Geometry g = make_geometry(x, conv, out_h, out_w);
  const at::Tensor xc = channels_last(x), coeffs = coeffs_in.contiguous();
  const int64_t C = g.channels, T = g.taps(), P = g.positions();
  const int64_t regions = coeffs.size(1), Q = coeffs.size(2), rows = grad_rows.size(0);
  at::Tensor scores = at::empty({g.batch, regions, out_h, out_w}, x.options());
  const int64_t* order_p = order.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stencil_region_scores", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* a = coeffs.data_ptr<scalar_t>();
    scalar_t* out = scores.data_ptr<scalar_t>();
    at::NoGradGuard no_grad;
    for (int64_t first = 0; first < rows; first += chunk_rows) {
      const int64_t count = std::min(chunk_rows, rows - first);
      const at::Tensor back = at::mm(grad_rows.narrow(0, first, count), stacked);  // (count, m * Q * C)
      const scalar_t* bp = back.data_ptr<scalar_t>();
      at::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> sums(regions * Q * T);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t pos = order_p[first + i], b = pos / P, p = pos % P;
          const scalar_t* row = bp + i * regions * Q * C;
          const scalar_t* sample = xp + b * g.height * g.width * C;
          std::fill(sums.begin(), sums.end(), scalar_t(0));
          for_each_tap(g, p, [&](int64_t tap, int64_t h, int64_t w) {
            const scalar_t* pixel = sample + (h * g.width + w) * C;
            for (int64_t jq = 0; jq < regions * Q; ++jq) {
              const scalar_t* block = row + jq * C;
              scalar_t sum = 0;
_Pragma("omp simd reduction(+ : sum)")
              for (int64_t c = 0; c < C; ++c) sum += block[c] * pixel[c];
              sums[jq * T + tap] = sum;
            }
          });
          for (int64_t j = 0; j < regions; ++j) {
            const scalar_t* coef = a + (b * regions + j) * Q * T;
            scalar_t score = 0;
            for (int64_t k = 0; k < Q * T; ++k) score += coef[k] * sums[j * Q * T + k];
            out[(b * regions + j) * P + p] = score;
          }
        }
      });
    }
  });
  return scores;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("route", &route);
  m.def("gather_features", &gather_features);
  m.def("bucket_matmul", &bucket_matmul);
  m.def("bucket_matmul_backward", &bucket_matmul_backward);
  m.def("scatter_rows", &scatter_rows);
  m.def("gather_rows", &gather_rows);
  m.def("features_backward_input", &features_backward_input);
  m.def("features_backward_coeffs", &features_backward_coeffs);
  m.def("stencil_region_scores", &stencil_region_scores);
}
