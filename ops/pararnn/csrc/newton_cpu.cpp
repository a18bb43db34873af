// ParaRNN's fused Newton solve and adjoint backward for ParaGRU and ParaLSTM on the CPU
// (the CPU counterpart of triton_fused.py; the math is exactly ParaGRU.step_and_jacobian / ParaLSTM._forward).
//
// The recurrence is channel-wise, so the work splits into independent items: one sequence `b` and a run of
// LANES channels (fewer at the end of a row). Parallelism is across items (Python gives each thread a range);
// inside an item the linear recurrence delta_t = A_t delta_{t-1} + r_t runs sequentially in time, which on a
// few cores is the cheapest way to solve it.
//
// Forward: all Newton iterations in ONE pass over time. Iterate k at step t needs only iterate k-1 at steps
// t-1 and t, so at each step the initial guess and then iterations 1..K are evaluated in turn, each level
// keeping its own h_{t-1} and delta_{t-1}. The operations and their order per element are those of K separate
// sweeps, but u is read once and h written once instead of once per iteration.
//
// Backward: one reverse pass. lambda_t = g_t + A_{t+1}^T lambda_{t+1}, and in the same pass the VJP of
// f(h_{t-1}, u_t) with cotangent lambda_t, which gives du_t, this item's share of the parameter gradients,
// and (its h_{t-1} part) A_t^T lambda_t, the next carry; at t = 0 that is the initial state's gradient.
//
// Plain C ABI (no torch headers: builds in seconds), called through ctypes.
//
// Layouts (row-major, contiguous): u [B, T, 3, N]; a [3, N]; p [2, N]; GRU states [B, T, N]; LSTM states
// [B, T, 2N] as [c; h]; initial [B, S] or null; du like u; da_part [B, 3, N]; dp_part [B, 2, N] (summed
// over B by the caller).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// One cache line of fp32 per gate row and step. Of 16, 32 and 64 channels per item, 16 was the fastest for the
// LSTM and as fast as the others for the GRU (wider items keep more arrays live). Items are compiled for
// exactly LANES channels, so the loops have a constant trip count, with a runtime-width copy for the last,
// narrower item of a row.
constexpr int64_t LANES = 16;
// exp inlined for fp32 (Cephes' expf: Cody–Waite reduction to |r| <= ln2/2, a degree-6 polynomial, 2^n by
// exponent bits; about 1 ulp on the clamped range). Inline, the gate loops stay one vectorised body; a call to
// the vector libm exp spills every live vector register around it (the kernels ran about 1.5x slower).
// fp64 (the tests' exact path) keeps std::exp.
template <typename S>
inline S exp_(S x) {
  return std::exp(x);
}

template <>
inline float exp_<float>(float x) {
  x = std::fmin(std::fmax(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

template <typename S>
inline S sigmoid(S x) {
  return S(1) / (S(1) + exp_(-x));
}

template <typename S>
inline S tanh_exp(S x) {
  // 2σ(2x) − 1, as the Triton kernels: one exp, vectorised by the compiler like sigmoid.
  return S(2) / (S(1) + exp_(S(-2) * x)) - S(1);
}

struct Item {
  int64_t b, n0, width;
};

inline Item item_of(int64_t index, int64_t N) {
  const int64_t per_row = (N + LANES - 1) / LANES;
  const int64_t n0 = (index % per_row) * LANES;
  return {index / per_row, n0, N - n0 < LANES ? N - n0 : LANES};
}

// Gate activations of one time step for the item's channels, into small arrays, one stage per dependency
// level: short loops with independent iterations that the out-of-order core overlaps (one fused loop body
// chained three exps and stalled on their latency; measured about 1.5x slower).

// ---------------------------------------------------------------- GRU (diagonal Jacobian)

template <typename S>
struct GruGates {
  S z[LANES], r[LANES], n[LANES];
};

template <typename S, bool FULL>
inline void gru_gates(int64_t width, const S* __restrict az, const S* __restrict ar, const S* __restrict ah,
                      const S* __restrict hp, const S* __restrict ut, int64_t N, GruGates<S>& q) {
  // z = σ(a_z h + u_z), r = σ(a_r h + u_r), n = tanh(a_h (r h) + u_h).
  const int64_t w = FULL ? LANES : width;
  for (int64_t j = 0; j < w; ++j) {
    q.z[j] = sigmoid(az[j] * hp[j] + ut[j]);
    q.r[j] = sigmoid(ar[j] * hp[j] + ut[N + j]);
  }
  for (int64_t j = 0; j < w; ++j) q.n[j] = tanh_exp(ah[j] * (q.r[j] * hp[j]) + ut[2 * N + j]);
}

template <typename S, bool FULL>
void gru_forward_item(const Item& it, const S* __restrict u, const S* __restrict a, const S* __restrict init,
                      S* __restrict h, int64_t T, int64_t N, int64_t iters, S omega, bool zero_guess,
                      S* __restrict prev, S* __restrict delta) {
  S start[LANES], zeros[LANES] = {}, cur[LANES];
  GruGates<S> q;
  const int64_t w = FULL ? LANES : it.width;
  const S* __restrict az = a + it.n0;
  const S* __restrict ar = a + N + it.n0;
  const S* __restrict ah = a + 2 * N + it.n0;
  const S* __restrict ub = u + it.b * T * 3 * N + it.n0;
  S* __restrict hb = h + it.b * T * N + it.n0;
  for (int64_t j = 0; j < w; ++j) start[j] = init ? init[it.b * N + it.n0 + j] : S(0);
  for (int64_t k = 0; k < iters; ++k) {
    for (int64_t j = 0; j < w; ++j) {
      prev[k * LANES + j] = start[j];
      delta[k * LANES + j] = S(0);
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    const S* __restrict ut = ub + t * 3 * N;
    // Level 0, the initial guess: f(0, u_t) (f(h_{-1}, u_0) at t = 0), or zeros.
    if (zero_guess) {
      for (int64_t j = 0; j < w; ++j) cur[j] = S(0);
    } else {
      const S* __restrict hp = t == 0 ? start : zeros;
      gru_gates<S, FULL>(w, az, ar, ah, hp, ut, N, q);
      for (int64_t j = 0; j < w; ++j) cur[j] = hp[j] + q.z[j] * (q.n[j] - hp[j]);
    }
    // Level k+1 linearises at iterate k: h_{t-1} = prev[k], h_t = cur.
    for (int64_t k = 0; k < iters; ++k) {
      S* __restrict hp = prev + k * LANES;
      S* __restrict dk = delta + k * LANES;
      gru_gates<S, FULL>(w, az, ar, ah, hp, ut, N, q);
      for (int64_t j = 0; j < w; ++j) {
        // f = h + z (n − h); A = (1−z) + (n−h) a_z σ'_z + z a_h tanh'_n (r + h a_r σ'_r).
        const S z = q.z[j], r = q.r[j], n = q.n[j], old = cur[j];
        const S diff = n - hp[j];
        const S f = hp[j] + z * diff;
        const S dr = r + hp[j] * ar[j] * r * (S(1) - r);
        const S jac = (S(1) - z) + diff * az[j] * z * (S(1) - z) + z * (S(1) - n * n) * ah[j] * dr;
        dk[j] = jac * dk[j] + (f - old);
        hp[j] = old;
        cur[j] = old + omega * dk[j];
      }
    }
    S* __restrict ht = hb + t * N;
    for (int64_t j = 0; j < w; ++j) ht[j] = cur[j];
  }
}

template <typename S>
void gru_forward(const S* __restrict u, const S* __restrict a, const S* __restrict init, S* __restrict h, int64_t T,
                 int64_t N, int64_t iters, S omega, bool zero_guess, int64_t begin, int64_t end) {
  // Per level k: prev[k] = h^(k)_{t-1} (k = 0 … iters-1; level k+1 reads it), delta[k] = δ^(k+1)_{t-1}.
  std::vector<S> scratch(2 * (iters > 0 ? iters : 1) * LANES);
  S* __restrict prev = scratch.data();
  S* __restrict delta = prev + (iters > 0 ? iters : 1) * LANES;
  for (int64_t index = begin; index < end; ++index) {
    const Item it = item_of(index, N);
    if (it.width == LANES) {
      gru_forward_item<S, true>(it, u, a, init, h, T, N, iters, omega, zero_guess, prev, delta);
    } else {
      gru_forward_item<S, false>(it, u, a, init, h, T, N, iters, omega, zero_guess, prev, delta);
    }
  }
}

template <typename S, bool FULL>
void gru_backward_item(const Item& it, const S* __restrict u, const S* __restrict a, const S* __restrict init,
                       const S* __restrict h, const S* __restrict g, S* __restrict du, S* __restrict da_part,
                       S* __restrict dinit, int64_t T, int64_t N) {
  S start[LANES], carry[LANES], gaz[LANES], gar[LANES], gah[LANES];
  GruGates<S> q;
  const int64_t w = FULL ? LANES : it.width;
  const S* __restrict az = a + it.n0;
  const S* __restrict ar = a + N + it.n0;
  const S* __restrict ah = a + 2 * N + it.n0;
  const int64_t ubase = it.b * T * 3 * N + it.n0, hbase = it.b * T * N + it.n0;
  for (int64_t j = 0; j < w; ++j) {
    start[j] = init ? init[it.b * N + it.n0 + j] : S(0);
    carry[j] = gaz[j] = gar[j] = gah[j] = S(0);
  }
  for (int64_t t = T - 1; t >= 0; --t) {
    S* __restrict dut = du + ubase + t * 3 * N;
    const S* __restrict gt = g + hbase + t * N;
    const S* __restrict hp = t > 0 ? h + hbase + (t - 1) * N : start;
    gru_gates<S, FULL>(w, az, ar, ah, hp, u + ubase + t * 3 * N, N, q);
    for (int64_t j = 0; j < w; ++j) {
      // The VJP of f(h_{t-1}, u_t) with λ_t; its h_{t-1} part is A_tᵀ λ_t, the next carry.
      const S z = q.z[j], r = q.r[j], n = q.n[j];
      const S lam = gt[j] + carry[j];
      const S gz = lam * (n - hp[j]) * z * (S(1) - z);
      const S gq = lam * z * (S(1) - n * n);
      const S gr = gq * ah[j] * hp[j] * r * (S(1) - r);
      dut[j] = gz;
      dut[N + j] = gr;
      dut[2 * N + j] = gq;
      gaz[j] += gz * hp[j];
      gar[j] += gr * hp[j];
      gah[j] += gq * r * hp[j];
      carry[j] = lam * (S(1) - z) + gz * az[j] + gq * ah[j] * r + gr * ar[j];
    }
  }
  S* __restrict dab = da_part + it.b * 3 * N + it.n0;
  for (int64_t j = 0; j < w; ++j) {
    dab[j] = gaz[j];
    dab[N + j] = gar[j];
    dab[2 * N + j] = gah[j];
    if (dinit) dinit[it.b * N + it.n0 + j] = carry[j];
  }
}

template <typename S>
void gru_backward(const S* __restrict u, const S* __restrict a, const S* __restrict init, const S* __restrict h,
                  const S* __restrict g, S* __restrict du, S* __restrict da_part, S* __restrict dinit, int64_t T,
                  int64_t N, int64_t begin, int64_t end) {
  for (int64_t index = begin; index < end; ++index) {
    const Item it = item_of(index, N);
    if (it.width == LANES) {
      gru_backward_item<S, true>(it, u, a, init, h, g, du, da_part, dinit, T, N);
    } else {
      gru_backward_item<S, false>(it, u, a, init, h, g, du, da_part, dinit, T, N);
    }
  }
}

// ---------------------------------------------------------------- LSTM-CIFG with peepholes (2×2 blocks)

template <typename S>
struct LstmGates {
  S f[LANES], cand[LANES], cn[LANES], o[LANES], tc[LANES];
};

template <typename S, bool FULL>
inline void lstm_gates(int64_t width, const S* __restrict af, const S* __restrict ao, const S* __restrict ac,
                       const S* __restrict pf, const S* __restrict po, const S* __restrict c, const S* __restrict hh,
                       const S* __restrict ut, int64_t N, LstmGates<S>& q) {
  // f = σ(a_f h + p_f c + u_f), c̃ = tanh(a_c h + u_c), c' = c̃ + f (c − c̃), o = σ(a_o h + p_o c' + u_o).
  const int64_t w = FULL ? LANES : width;
  for (int64_t j = 0; j < w; ++j) {
    q.f[j] = sigmoid(af[j] * hh[j] + pf[j] * c[j] + ut[j]);
    q.cand[j] = tanh_exp(ac[j] * hh[j] + ut[2 * N + j]);
  }
  for (int64_t j = 0; j < w; ++j) {
    q.cn[j] = q.cand[j] + q.f[j] * (c[j] - q.cand[j]);
    q.o[j] = sigmoid(ao[j] * hh[j] + po[j] * q.cn[j] + ut[N + j]);
    q.tc[j] = tanh_exp(q.cn[j]);
  }
}

template <typename S, bool FULL>
void lstm_forward_item(const Item& it, const S* __restrict u, const S* __restrict a, const S* __restrict p,
                       const S* __restrict init, S* __restrict x, int64_t T, int64_t N, int64_t iters, S omega,
                       bool zero_guess, S* __restrict prev_c, S* __restrict prev_h, S* __restrict delta_c,
                       S* __restrict delta_h) {
  S c0[LANES], h0[LANES], zeros[LANES] = {}, cur_c[LANES], cur_h[LANES];
  LstmGates<S> q;
  const int64_t w = FULL ? LANES : it.width;
  const S* __restrict af = a + it.n0;
  const S* __restrict ao = a + N + it.n0;
  const S* __restrict ac = a + 2 * N + it.n0;
  const S* __restrict pf = p + it.n0;
  const S* __restrict po = p + N + it.n0;
  const S* __restrict ub = u + it.b * T * 3 * N + it.n0;
  S* __restrict xb = x + it.b * T * 2 * N + it.n0;  // c at xb + t*2N, h at xb + t*2N + N
  for (int64_t j = 0; j < w; ++j) {
    c0[j] = init ? init[it.b * 2 * N + it.n0 + j] : S(0);
    h0[j] = init ? init[it.b * 2 * N + N + it.n0 + j] : S(0);
  }
  for (int64_t k = 0; k < iters; ++k) {
    for (int64_t j = 0; j < w; ++j) {
      prev_c[k * LANES + j] = c0[j];
      prev_h[k * LANES + j] = h0[j];
      delta_c[k * LANES + j] = delta_h[k * LANES + j] = S(0);
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    const S* __restrict ut = ub + t * 3 * N;
    if (zero_guess) {
      for (int64_t j = 0; j < w; ++j) cur_c[j] = cur_h[j] = S(0);
    } else {
      lstm_gates<S, FULL>(w, af, ao, ac, pf, po, t == 0 ? c0 : zeros, t == 0 ? h0 : zeros, ut, N, q);
      for (int64_t j = 0; j < w; ++j) {
        cur_c[j] = q.cn[j];
        cur_h[j] = q.o[j] * q.tc[j];
      }
    }
    for (int64_t k = 0; k < iters; ++k) {
      S* __restrict cp = prev_c + k * LANES;
      S* __restrict hp = prev_h + k * LANES;
      S* __restrict dc = delta_c + k * LANES;
      S* __restrict dh = delta_h + k * LANES;
      lstm_gates<S, FULL>(w, af, ao, ac, pf, po, cp, hp, ut, N, q);
      for (int64_t j = 0; j < w; ++j) {
        const S f = q.f[j], cand = q.cand[j], cn = q.cn[j], o = q.o[j], tc = q.tc[j];
        const S c_old = cur_c[j], h_old = cur_h[j];
        const S df = f * (S(1) - f) * (cp[j] - cand);
        const S dc_dc = f + df * pf[j];
        const S dc_dh = df * af[j] + (S(1) - f) * ac[j] * (S(1) - cand * cand);
        const S d_o = o * (S(1) - o) * tc;
        const S dtanh = o * (S(1) - tc * tc);
        const S dh_dc = (dtanh + d_o * po[j]) * dc_dc;
        const S dh_dh = d_o * (ao[j] + po[j] * dc_dh) + dtanh * dc_dh;
        const S new_dc = dc_dc * dc[j] + dc_dh * dh[j] + (cn - c_old);
        const S new_dh = dh_dc * dc[j] + dh_dh * dh[j] + (o * tc - h_old);
        dc[j] = new_dc;
        dh[j] = new_dh;
        cp[j] = c_old;
        hp[j] = h_old;
        cur_c[j] = c_old + omega * new_dc;
        cur_h[j] = h_old + omega * new_dh;
      }
    }
    S* __restrict ct = xb + t * 2 * N;
    for (int64_t j = 0; j < w; ++j) {
      ct[j] = cur_c[j];
      ct[N + j] = cur_h[j];
    }
  }
}

template <typename S>
void lstm_forward(const S* __restrict u, const S* __restrict a, const S* __restrict p, const S* __restrict init,
                  S* __restrict x, int64_t T, int64_t N, int64_t iters, S omega, bool zero_guess, int64_t begin,
                  int64_t end) {
  // Per level k: (c, h)^(k)_{t-1} and δ^(k+1)_{t-1}, as in gru_forward.
  const int64_t levels = iters > 0 ? iters : 1;
  std::vector<S> scratch(4 * levels * LANES);
  S* __restrict prev_c = scratch.data();
  S* __restrict prev_h = prev_c + levels * LANES;
  S* __restrict delta_c = prev_h + levels * LANES;
  S* __restrict delta_h = delta_c + levels * LANES;
  for (int64_t index = begin; index < end; ++index) {
    const Item it = item_of(index, N);
    if (it.width == LANES) {
      lstm_forward_item<S, true>(it, u, a, p, init, x, T, N, iters, omega, zero_guess, prev_c, prev_h, delta_c,
                                 delta_h);
    } else {
      lstm_forward_item<S, false>(it, u, a, p, init, x, T, N, iters, omega, zero_guess, prev_c, prev_h, delta_c,
                                  delta_h);
    }
  }
}

template <typename S, bool FULL>
void lstm_backward_item(const Item& it, const S* __restrict u, const S* __restrict a, const S* __restrict p,
                        const S* __restrict init, const S* __restrict x, const S* __restrict g, S* __restrict du,
                        S* __restrict da_part, S* __restrict dp_part, S* __restrict dinit, int64_t T, int64_t N) {
  S c0[LANES], h0[LANES], carry_c[LANES], carry_h[LANES], gaf[LANES], gao[LANES], gac[LANES], gpf[LANES], gpo[LANES];
  LstmGates<S> q;
  const int64_t w = FULL ? LANES : it.width;
  const S* __restrict af = a + it.n0;
  const S* __restrict ao = a + N + it.n0;
  const S* __restrict ac = a + 2 * N + it.n0;
  const S* __restrict pf = p + it.n0;
  const S* __restrict po = p + N + it.n0;
  const int64_t ubase = it.b * T * 3 * N + it.n0, xbase = it.b * T * 2 * N + it.n0;
  for (int64_t j = 0; j < w; ++j) {
    c0[j] = init ? init[it.b * 2 * N + it.n0 + j] : S(0);
    h0[j] = init ? init[it.b * 2 * N + N + it.n0 + j] : S(0);
    carry_c[j] = carry_h[j] = gaf[j] = gao[j] = gac[j] = gpf[j] = gpo[j] = S(0);
  }
  for (int64_t t = T - 1; t >= 0; --t) {
    S* __restrict dut = du + ubase + t * 3 * N;
    const S* __restrict gt = g + xbase + t * 2 * N;
    const S* __restrict c = t > 0 ? x + xbase + (t - 1) * 2 * N : c0;
    const S* __restrict hh = t > 0 ? x + xbase + (t - 1) * 2 * N + N : h0;
    lstm_gates<S, FULL>(w, af, ao, ac, pf, po, c, hh, u + ubase + t * 3 * N, N, q);
    for (int64_t j = 0; j < w; ++j) {
      // The VJP of f(h_{t-1}, u_t) with λ_t = (λ_c, λ_h); its (c, h)_{t-1} part is the next carry.
      const S f = q.f[j], cand = q.cand[j], cn = q.cn[j], o = q.o[j], tc = q.tc[j];
      const S lam_c = gt[j] + carry_c[j], lam_h = gt[N + j] + carry_h[j];
      const S g_pre_o = lam_h * tc * o * (S(1) - o);
      const S g_cn = lam_c + lam_h * o * (S(1) - tc * tc) + g_pre_o * po[j];
      const S g_pre_f = g_cn * (c[j] - cand) * f * (S(1) - f);
      const S g_pre_c = g_cn * (S(1) - f) * (S(1) - cand * cand);
      dut[j] = g_pre_f;
      dut[N + j] = g_pre_o;
      dut[2 * N + j] = g_pre_c;
      gaf[j] += g_pre_f * hh[j];
      gao[j] += g_pre_o * hh[j];
      gac[j] += g_pre_c * hh[j];
      gpf[j] += g_pre_f * c[j];
      gpo[j] += g_pre_o * cn;
      carry_c[j] = g_cn * f + g_pre_f * pf[j];
      carry_h[j] = g_pre_o * ao[j] + g_pre_f * af[j] + g_pre_c * ac[j];
    }
  }
  S* __restrict dab = da_part + it.b * 3 * N + it.n0;
  S* __restrict dpb = dp_part + it.b * 2 * N + it.n0;
  for (int64_t j = 0; j < w; ++j) {
    dab[j] = gaf[j];
    dab[N + j] = gao[j];
    dab[2 * N + j] = gac[j];
    dpb[j] = gpf[j];
    dpb[N + j] = gpo[j];
    if (dinit) {
      dinit[it.b * 2 * N + it.n0 + j] = carry_c[j];
      dinit[it.b * 2 * N + N + it.n0 + j] = carry_h[j];
    }
  }
}

template <typename S>
void lstm_backward(const S* __restrict u, const S* __restrict a, const S* __restrict p, const S* __restrict init,
                   const S* __restrict x, const S* __restrict g, S* __restrict du, S* __restrict da_part,
                   S* __restrict dp_part, S* __restrict dinit, int64_t T, int64_t N, int64_t begin, int64_t end) {
  for (int64_t index = begin; index < end; ++index) {
    const Item it = item_of(index, N);
    if (it.width == LANES) {
      lstm_backward_item<S, true>(it, u, a, p, init, x, g, du, da_part, dp_part, dinit, T, N);
    } else {
      lstm_backward_item<S, false>(it, u, a, p, init, x, g, du, da_part, dp_part, dinit, T, N);
    }
  }
}

}  // namespace

#define SEQZOO_EXPORT(S, SUFFIX)                                                                                      \
  extern "C" void seqzoo_gru_forward_##SUFFIX(const S* u, const S* a, const S* init, S* h, int64_t T, int64_t N,      \
                                              int64_t iters, double omega, int zero_guess, int64_t begin,             \
                                              int64_t end) {                                                          \
    gru_forward<S>(u, a, init, h, T, N, iters, S(omega), zero_guess != 0, begin, end);                                \
  }                                                                                                                   \
  extern "C" void seqzoo_gru_backward_##SUFFIX(const S* u, const S* a, const S* init, const S* h, const S* g, S* du,  \
                                               S* da_part, S* dinit, int64_t T, int64_t N, int64_t begin,             \
                                               int64_t end) {                                                         \
    gru_backward<S>(u, a, init, h, g, du, da_part, dinit, T, N, begin, end);                                          \
  }                                                                                                                   \
  extern "C" void seqzoo_lstm_forward_##SUFFIX(const S* u, const S* a, const S* p, const S* init, S* x, int64_t T,    \
                                               int64_t N, int64_t iters, double omega, int zero_guess, int64_t begin, \
                                               int64_t end) {                                                         \
    lstm_forward<S>(u, a, p, init, x, T, N, iters, S(omega), zero_guess != 0, begin, end);                            \
  }                                                                                                                   \
  extern "C" void seqzoo_lstm_backward_##SUFFIX(const S* u, const S* a, const S* p, const S* init, const S* x,        \
                                                const S* g, S* du, S* da_part, S* dp_part, S* dinit, int64_t T,       \
                                                int64_t N, int64_t begin, int64_t end) {                              \
    lstm_backward<S>(u, a, p, init, x, g, du, da_part, dp_part, dinit, T, N, begin, end);                             \
  }

extern "C" int64_t seqzoo_lanes() { return LANES; }

SEQZOO_EXPORT(float, f32)
SEQZOO_EXPORT(double, f64)
