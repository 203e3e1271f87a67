// ai.attn2onnx::DcmhaAttention — fused DCMHA attention core, ONNX Runtime CPU kernel (lite API).
//
// Contract (custom_ops/README.md; v may have its own head dim dv): L = q k^T * scale; L = Compose(L, pre) on the unmasked logits;
// L = where(allowed, L, NEG); P = softmax(L) in fp32; P = Compose(P, post); o = P v.
// Compose on the head vector a at (t,s): a + (a U_t^T) V_t + (a U_s^T) V_s + a*g_t + a*g_s (+ a Wb).
//
// Scheme (exact, no [B,N,T,S] buffer): one work item = (batch, block of kTq query rows), run on
// ORT's intra-op thread pool. A work item keeps the scores of all N heads of its rows over the key
// range they can see (a [kTq, N, W] panel in thread-local scratch, W <= S), so every (t,s) has all
// its heads at hand for the head-mixing composes. Two sweeps over the keys, chunk by chunk (a
// chunk's scores, all heads, stay in L2 between the steps):
//   pass 1, per chunk: 1. QK^T for every head (register-blocked micro-kernel, keys packed);
//     2. pre-compose in place on the unmasked logits, then mask (causal / local window / key
//     padding) with NEG; 3. e = exp(L - chunk max) in place, chunk sums (fp32).
//   between: row max m and sum l over the chunks (exact online-softmax rescaling: chunk c's
//     probabilities are e * exp(m_c - m) / l).
//   pass 2, per chunk: 4. normalise and post-compose in place (the contract composes normalised
//     probabilities); 5. o += P v for every head (register-blocked micro-kernel, values packed).
// QK^T is computed once (a flash-style scheme that keeps no panel would compute it twice, because
// the post-compose needs the final normalisers of every head); the panel costs O(N * kTq * S) per
// thread. Keys that no row of the block can see (causal, window, padding) are skipped: a masked
// (t,s) has probability 0 in every head (the mask is shared by the heads), and compose maps a zero
// head vector to zero, so skipped keys contribute nothing. A row that sees no key at all is a
// softmax over S entries of NEG (uniform), so a block holding such a row keeps the full key range.
// Work items are independent and each row is computed in one fixed order: any thread count gives
// bit-identical results.
#include "attn2onnx_native.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>

namespace attn2onnx {
namespace {

#if defined(__AVX512F__)
constexpr int kMR = 8;  // micro-tile rows; 2 * kMR accumulators + 3 live registers out of 32
#else
constexpr int kMR = 6;  // 12 accumulators + 3 out of 16
#endif
constexpr int kCB = 2 * kVL;     // micro-tile columns (keys for QK^T, head dims for PV)
constexpr int kTq = 4 * kMR;     // query rows per work item
constexpr int kChunk = 4 * kCB;  // keys per chunk: a chunk's scores, all heads, stay in L2
constexpr int kMaxR = 16;

struct Problem {
  int64_t B, T, S, N, d, dv, R;  // d: q/k head dim, dv: v head dim
  float scale;
  bool causal, use_static;
  int64_t window;
  int64_t Sp, dvb, nqb;  // Sp: S rounded up to kCB; dvb: dv / kCB rounded up
  const float* q;        // [B,T,N,d]
  const float* qf;       // [B,T,2,2R+1,N]
  // Packed so that every micro-kernel streams contiguous memory (no 4 KiB-strided rows that
  // would fight over the same L1 sets); zero padded past S and past dv.
  const float* kt;       // [B,N,Sp/kCB,d,kCB]         keys, transposed per block of kCB keys
  const float* vp;       // [B,N,dvb,Sp,kCB]           values, per block of kCB head dims
  const float* kf;       // [B,2,Sp/kVL,2R+1,N,kVL]    key-side factors, per group of kVL keys
  const float* wb;       // [2,N,N]
  const int32_t* pad;    // [B,Sp]           1 = real key (0 past S)
  const int64_t* count;  // [B,S+1]          prefix counts of real keys
  float* out;            // [B,T,N,dv]
  std::atomic<bool> failed{false};
};

// ------------------------------------------------------------------ micro-kernels
// C[MR, 2*kVL] = scale * A[MR, K] * B[K, 2*kVL]; A rows strided (lda), B rows strided (ldb).
template <int MR>
inline void qk_tile(const float* a, ptrdiff_t lda, const float* b, ptrdiff_t ldb, int64_t K, float* c,
                    ptrdiff_t ldc, float scale) {
  vf c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    const vf b0 = vload(b + k * ldb), b1 = vload(b + k * ldb + kVL);
    for (int i = 0; i < MR; ++i) {
      const vf ai = vset1(a[i * lda + k]);
      c0[i] += ai * b0;
      c1[i] += ai * b1;
    }
  }
  const vf s = vset1(scale);
  for (int i = 0; i < MR; ++i) {
    vstore(c + i * ldc, c0[i] * s);
    vstore(c + i * ldc + kVL, c1[i] * s);
  }
}

// C[MR, ncols] (+)= A[MR, K] * B[K, NV*kVL] (ncols <= NV*kVL columns loaded / stored).
template <int MR, int NV>
inline void pv_tile(const float* a, ptrdiff_t lda, const float* b, ptrdiff_t ldb, int64_t K, float* c,
                    ptrdiff_t ldc, int ncols, bool accumulate) {
  vf acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = vf{};
  if (accumulate) {
    float tmp[NV * kVL] = {};
    for (int i = 0; i < MR; ++i) {
      std::memcpy(tmp, c + i * ldc, sizeof(float) * ncols);
      for (int v = 0; v < NV; ++v) acc[i][v] = vload(tmp + v * kVL);
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    vf bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = vload(b + k * ldb + v * kVL);
    for (int i = 0; i < MR; ++i) {
      const vf ai = vset1(a[i * lda + k]);
      for (int v = 0; v < NV; ++v) acc[i][v] += ai * bv[v];
    }
  }
  if (ncols == NV * kVL) {
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) vstore(c + i * ldc + v * kVL, acc[i][v]);
  } else {
    float tmp[NV * kVL];
    for (int i = 0; i < MR; ++i) {
      for (int v = 0; v < NV; ++v) vstore(tmp + v * kVL, acc[i][v]);
      std::memcpy(c + i * ldc, tmp, sizeof(float) * ncols);
    }
  }
}

template <int MR>
void qk_rows(int64_t rows, const float* a, ptrdiff_t lda, const float* b, ptrdiff_t ldb, int64_t K, float* c,
             ptrdiff_t ldc, float scale) {
  if constexpr (MR > 0) {
    if (rows >= MR) {
      qk_tile<MR>(a, lda, b, ldb, K, c, ldc, scale);
    } else {
      qk_rows<MR - 1>(rows, a, lda, b, ldb, K, c, ldc, scale);
    }
  }
}

template <int MR, int NV>
void pv_rows(int64_t rows, const float* a, ptrdiff_t lda, const float* b, ptrdiff_t ldb, int64_t K, float* c,
             ptrdiff_t ldc, int ncols, bool accumulate) {
  if constexpr (MR > 0) {
    if (rows >= MR) {
      pv_tile<MR, NV>(a, lda, b, ldb, K, c, ldc, ncols, accumulate);
    } else {
      pv_rows<MR - 1, NV>(rows, a, lda, b, ldb, K, c, ldc, ncols, accumulate);
    }
  }
}

// ------------------------------------------------------------------ compose
// Compose one group of kVL keys for one query row, all heads, in place.
//   a: head n's kVL scores at a + n * as;   qfs: the row's query factors [2R+1, N] for the slot;
//   kfs: key factors of the slot at the group's first key, element (row, n) at kfs[(row*N + n)*ks];
//   wb: static mix [N, N] or null;   norm: per-head multiplier applied on load, or null;
//   keep(n, value) stores head n's result. RT = R at compile time (-1: runtime R).
template <int RT, typename Keep>
inline void compose_group(const float* a, ptrdiff_t as, int64_t N, int64_t R_runtime, const float* qfs,
                          const float* kfs, ptrdiff_t ks, const float* wb, const float* norm, vf* held,
                          Keep&& keep) {
  const int64_t R = RT >= 0 ? RT : R_runtime;
  constexpr int RA = RT > 0 ? RT : (RT == 0 ? 1 : kMaxR);
  vf qd[RA], kd[RA];
  for (int64_t r = 0; r < R; ++r) qd[r] = kd[r] = vf{};
  for (int64_t n = 0; n < N; ++n) {
    vf x = vload(a + n * as);
    if (norm) x *= norm[n];
    if (wb) held[n] = x;
    for (int64_t r = 0; r < R; ++r) {
      qd[r] += x * qfs[r * N + n];
      kd[r] += x * vload(kfs + (r * N + n) * ks);
    }
  }
  const float* gq = qfs + 2 * R * N;
  const float* gk = kfs + 2 * R * N * ks;
  for (int64_t n = 0; n < N; ++n) {
    vf x = wb ? held[n] : vload(a + n * as);
    if (norm && !wb) x *= norm[n];
    vf o = x * (vset1(1.f + gq[n]) + vload(gk + n * ks));
    for (int64_t r = 0; r < R; ++r) {
      o += qd[r] * qfs[(R + r) * N + n];
      o += kd[r] * vload(kfs + ((R + r) * N + n) * ks);
    }
    if (wb) {
      for (int64_t m = 0; m < N; ++m) o += held[m] * wb[m * N + n];
    }
    keep(n, o);
  }
}

// ------------------------------------------------------------------ one work item
template <int RT>
void run_block(const Problem& p, int64_t item) {
  const int64_t N = p.N, d = p.d, R = p.R, F = 2 * p.R + 1, S = p.S, T = p.T, Sp = p.Sp;
  const int64_t b = item / p.nqb, qb = p.nqb - 1 - item % p.nqb;  // heavy (late) causal blocks first
  const int64_t t0 = qb * kTq, tn = std::min<int64_t>(kTq, T - t0);
  const int64_t* count = p.count + b * (S + 1);
  const int32_t* pad = p.pad + b * Sp;

  // Keys each row may see: [lo, hi] from causal / window (query t sits at t + S - T).
  int64_t lo[kTq], hi[kTq];
  bool every_row_sees_a_key = true;
  int64_t s_lo = S, s_hi = 0;
  for (int64_t i = 0; i < tn; ++i) {
    const int64_t pos = t0 + i + S - T;
    hi[i] = p.causal ? std::min(S - 1, pos) : S - 1;
    lo[i] = (p.causal && p.window > 0) ? std::max<int64_t>(0, pos - p.window + 1) : 0;
    const bool sees = lo[i] <= hi[i] && count[hi[i] + 1] - count[lo[i]] > 0;
    every_row_sees_a_key = every_row_sees_a_key && sees;
    s_lo = std::min(s_lo, lo[i]);
    s_hi = std::max(s_hi, hi[i] + 1);
  }
  if (every_row_sees_a_key) {  // trim keys that are padding for every row
    while (s_lo < s_hi && !pad[s_lo]) ++s_lo;
    while (s_hi > s_lo && !pad[s_hi - 1]) --s_hi;
  } else {
    s_lo = 0;
    s_hi = S;
  }
  s_lo = s_lo / kCB * kCB;  // so that s_lo + Wp <= Sp
  const int64_t W = s_hi - s_lo, Wp = round_up(W, kCB);

  // Scratch: scores [kTq, N, Wld] | chunk max vectors [kTq*N] | held [N] vectors |
  // per-chunk row max and sum, then scale [nch, kTq, N] each.
  // Wld = Wp + kVL: consecutive heads' rows never sit a multiple of 4 KiB apart.
  const int64_t Wld = Wp + kVL, nch = (Wp + kChunk - 1) / kChunk;
  const size_t panel = static_cast<size_t>(N * kTq * Wld);
  float* scratch = thread_scratch(panel + (N * kTq + N + 1) * kVL + 2 * nch * kTq * N);
  float* L = scratch;
  uintptr_t base = reinterpret_cast<uintptr_t>(scratch + panel);  // vf-aligned vector arrays
  base = (base + sizeof(vf) - 1) / sizeof(vf) * sizeof(vf);
  vf* maxv = reinterpret_cast<vf*>(base);
  vf* held = maxv + N * kTq;
  float* chunk_max = reinterpret_cast<float*>(held + N);  // [nch, kTq, N]
  float* chunk_scale = chunk_max + nch * kTq * N;        // [nch, kTq, N]: sums, then exp(m_c - m) / l
  auto row = [&](int64_t n, int64_t i) { return L + (i * N + n) * Wld; };
  auto stat = [&](float* a, int64_t ci, int64_t i, int64_t n) -> float& { return a[(ci * kTq + i) * N + n]; };

  const float* wb_pre = p.use_static ? p.wb : nullptr;
  const float* wb_post = p.use_static ? p.wb + N * N : nullptr;
  // key factors of key s_lo + c: kf_slot + c * F * N (c a multiple of kVL); (row, n) at (row*N + n)*kVL
  const float* kf_pre = p.kf + ((b * 2 + 0) * (Sp / kVL) + s_lo / kVL) * F * N * kVL;
  const float* kf_post = p.kf + ((b * 2 + 1) * (Sp / kVL) + s_lo / kVL) * F * N * kVL;
  const vi iota = viota();

  // Pass 1, one chunk of kChunk keys at a time (the chunk's scores stay in L2 throughout):
  // scores, pre-compose, mask, chunk max, exp(L - chunk max) and chunk sums.
  for (int64_t ci = 0; ci < nch; ++ci) {
    const int64_t c0 = ci * kChunk, c1 = std::min<int64_t>(Wp, c0 + kChunk);
    // 1. scores = scale * q k^T, every head.
    for (int64_t n = 0; n < N; ++n) {
      const float* kb = p.kt + ((b * N + n) * (Sp / kCB) + s_lo / kCB) * d * kCB;
      const float* qa = p.q + ((b * T + t0) * N + n) * d;
      for (int64_t j = c0; j < c1; j += kCB)
        for (int64_t i = 0; i < tn; i += kMR)
          qk_rows<kMR>(tn - i, qa + i * N * d, N * d, kb + j * d, kCB, d, row(n, i) + j, N * Wld, p.scale);
    }
    // 2. pre-compose (slot 0) on the unmasked logits, then mask, tracking the max.
    for (int64_t x = 0; x < N * kTq; ++x) maxv[x] = vset1(kNeg);
    for (int64_t i = 0; i < tn; ++i) {
      const float* qfs = p.qf + ((b * T + t0 + i) * 2 + 0) * F * N;
      for (int64_t c = c0; c < c1; c += kVL) {
        const vi s = iota + static_cast<int32_t>(s_lo + c);
        vi real;
        std::memcpy(&real, pad + s_lo + c, sizeof real);
        const vi allowed = (s >= static_cast<int32_t>(lo[i])) & (s <= static_cast<int32_t>(hi[i])) & (real != 0);
        float* a = row(0, i) + c;
        compose_group<RT>(a, Wld, N, R, qfs, kf_pre + c * F * N, kVL, wb_pre, nullptr, held, [&](int64_t n, vf o) {
          o = allowed ? o : vset1(kNeg);
          vstore(a + n * Wld, o);
          maxv[i * N + n] = vmax(maxv[i * N + n], o);
        });
      }
    }
    // 3. exp(L - chunk max) and chunk sums over the W real columns; padded columns become 0.
    for (int64_t i = 0; i < tn; ++i) {
      for (int64_t n = 0; n < N; ++n) {
        float* r = row(n, i);
        const float m = hmax(maxv[i * N + n]);
        const vf mv = vset1(m);
        vf sum = vf{};
        for (int64_t c = c0; c < c1; c += kVL) {
          vf e = vexp_nonpos(vload(r + c) - mv);
          e = (iota + static_cast<int32_t>(c)) < static_cast<int32_t>(W) ? e : vf{};
          vstore(r + c, e);
          sum += e;
        }
        stat(chunk_max, ci, i, n) = m;
        stat(chunk_scale, ci, i, n) = hsum(sum);
      }
    }
  }

  // Row max and sum over the chunks; chunk ci's probabilities are its e * exp(m_ci - m) / l.
  // (A chunk a row cannot see has m_ci = NEG: its scale is exactly 0 unless the whole row is
  // masked, where every m_ci = m = NEG and the row comes out uniform, as the contract says.)
  for (int64_t i = 0; i < tn; ++i) {
    for (int64_t n = 0; n < N; ++n) {
      float m = kNeg;
      for (int64_t ci = 0; ci < nch; ++ci) m = std::max(m, stat(chunk_max, ci, i, n));
      float l = 0.f;
      for (int64_t ci = 0; ci < nch; ++ci) {
        const float f = std::exp(stat(chunk_max, ci, i, n) - m);
        stat(chunk_max, ci, i, n) = f;
        l += stat(chunk_scale, ci, i, n) * f;
      }
      const float inv = 1.f / l;
      for (int64_t ci = 0; ci < nch; ++ci) stat(chunk_scale, ci, i, n) = stat(chunk_max, ci, i, n) * inv;
    }
  }

  // Pass 2, chunk by chunk: normalise and post-compose (slot 1), then accumulate P v.
  const int64_t dv = p.dv;
  for (int64_t ci = 0; ci < nch; ++ci) {
    const int64_t c0 = ci * kChunk, c1 = std::min<int64_t>(Wp, c0 + kChunk);
    // 4. probabilities (normalised on load) post-composed in place.
    for (int64_t i = 0; i < tn; ++i) {
      const float* qfs = p.qf + ((b * T + t0 + i) * 2 + 1) * F * N;
      const float* norm = &stat(chunk_scale, ci, i, 0);
      for (int64_t c = c0; c < c1; c += kVL) {
        float* a = row(0, i) + c;
        compose_group<RT>(a, Wld, N, R, qfs, kf_post + c * F * N, kVL, wb_post, norm, held,
                          [&](int64_t n, vf o) { vstore(a + n * Wld, o); });
      }
    }
    // 5. o (+)= P v over the chunk, every head, straight into the output rows.
    const bool accumulate = ci > 0;
    for (int64_t n = 0; n < N; ++n) {
      const float* vb = p.vp + (b * N + n) * p.dvb * Sp * kCB + (s_lo + c0) * kCB;
      float* ob = p.out + ((b * T + t0) * N + n) * dv;
      for (int64_t i = 0; i < tn; i += kMR) {
        for (int64_t dc = 0; dc < dv; dc += kCB) {
          const int ncols = static_cast<int>(std::min<int64_t>(kCB, dv - dc));
          float* c = ob + i * N * dv + dc;
          if (ncols > kVL) {
            pv_rows<kMR, 2>(tn - i, row(n, i) + c0, N * Wld, vb + dc * Sp, kCB, c1 - c0, c, N * dv, ncols, accumulate);
          } else {
            pv_rows<kMR, 1>(tn - i, row(n, i) + c0, N * Wld, vb + dc * Sp, kCB, c1 - c0, c, N * dv, ncols, accumulate);
          }
        }
      }
    }
  }
}

using BlockFn = void (*)(const Problem&, int64_t);
BlockFn block_fn(int64_t R) {
  switch (R) {
    case 0: return run_block<0>;
    case 1: return run_block<1>;
    case 2: return run_block<2>;
    case 3: return run_block<3>;
    case 4: return run_block<4>;
    default: return run_block<-1>;
  }
}

struct Job {
  Problem* p;
  BlockFn fn;
};

void run_item(void* data, size_t item) {
  auto* job = static_cast<Job*>(data);
  try {
    job->fn(*job->p, static_cast<int64_t>(item));
  } catch (...) {
    job->p->failed = true;
  }
}

// ------------------------------------------------------------------ packing (per batch x head)
template <typename E>
struct PackJob {
  Problem* p;
  const E* k;
  const E* v;
  const E* kf;
  float* kt;
  float* vp;
  float* kfp;
};

template <typename E>
void pack_item(void* data, size_t item) {
  auto* job = static_cast<PackJob<E>*>(data);
  const Problem& p = *job->p;
  const int64_t b = static_cast<int64_t>(item) / p.N, n = static_cast<int64_t>(item) % p.N;
  const int64_t S = p.S, N = p.N, d = p.d, dv = p.dv, Sp = p.Sp, F = 2 * p.R + 1;
  float* kt = job->kt + (b * N + n) * Sp * d;
  float* vp = job->vp + (b * N + n) * p.dvb * Sp * kCB;
  for (int64_t s = 0; s < S; ++s) {
    const E* ks = job->k + ((b * S + s) * N + n) * d;
    const E* vs = job->v + ((b * S + s) * N + n) * dv;
    float* kdst = kt + (s / kCB) * d * kCB + s % kCB;
    for (int64_t j = 0; j < d; ++j) kdst[j * kCB] = to_float(ks[j]);
    for (int64_t j = 0; j < dv; ++j) vp[((j / kCB) * Sp + s) * kCB + j % kCB] = to_float(vs[j]);
  }
  if (n == 0) {  // all heads' factors of a key group sit together: one item per batch does them
    for (int64_t slot = 0; slot < 2; ++slot) {
      float* dst = job->kfp + (b * 2 + slot) * (Sp / kVL) * F * N * kVL;
      for (int64_t s = 0; s < S; ++s)
        for (int64_t r = 0; r < F; ++r)
          for (int64_t h = 0; h < N; ++h)
            dst[((s / kVL * F + r) * N + h) * kVL + s % kVL] = to_float(job->kf[(((b * S + s) * 2 + slot) * F + r) * N + h]);
    }
  }
}

template <typename E>
std::vector<float> to_float_vector(const E* data, size_t count) {
  std::vector<float> out(count);
  for (size_t i = 0; i < count; ++i) out[i] = to_float(data[i]);
  return out;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

// ------------------------------------------------------------------ the ORT kernel
template <typename E>
struct DcmhaAttentionKernel {
  float scale_;
  bool causal_, use_static_;
  int64_t window_;

  DcmhaAttentionKernel(const OrtApi* api, const OrtKernelInfo* info)
      : scale_(attr_float(api, info, "scale", 0.f)),
        causal_(attr_int(api, info, "causal", 0) != 0),
        use_static_(attr_int(api, info, "use_static_mix", 0) != 0),
        window_(attr_int(api, info, "window", 0)) {}

  static Ort::Status InferOutputShape(Ort::ShapeInferContext& ctx) {  // [B,T,N] of q, dv of v
    Ort::ShapeInferContext::Shape shape = ctx.GetInputShape(0);
    const Ort::ShapeInferContext::Shape& v_shape = ctx.GetInputShape(2);
    if (shape.size() == 4 && v_shape.size() == 4) shape[3] = v_shape[3];
    return ctx.SetOutputShape(0, shape, onnx_type<E>());
  }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<E>& q, const Ort::Custom::Tensor<E>& k,
                      const Ort::Custom::Tensor<E>& v, const Ort::Custom::Tensor<E>& q_factors,
                      const Ort::Custom::Tensor<E>& k_factors, const Ort::Custom::Tensor<bool>& key_padding_mask,
                      const Ort::Custom::Tensor<E>& static_mix, Ort::Custom::Tensor<E>& o) {
    try {
      return run(context, q, k, v, q_factors, k_factors, key_padding_mask, static_mix, o);
    } catch (const std::exception& e) {
      return Ort::Status((std::string("DcmhaAttention: ") + e.what()).c_str(), ORT_RUNTIME_EXCEPTION);
    }
  }

  Ort::Status run(OrtKernelContext* context, const Ort::Custom::Tensor<E>& q, const Ort::Custom::Tensor<E>& k,
                  const Ort::Custom::Tensor<E>& v, const Ort::Custom::Tensor<E>& q_factors,
                  const Ort::Custom::Tensor<E>& k_factors, const Ort::Custom::Tensor<bool>& key_padding_mask,
                  const Ort::Custom::Tensor<E>& static_mix, Ort::Custom::Tensor<E>& o) {
    const auto& qs = q.Shape();
    const auto& ks = k.Shape();
    const auto& qfs = q_factors.Shape();
    const auto& kfs = k_factors.Shape();
    const auto& ms = key_padding_mask.Shape();
    const auto& ws = static_mix.Shape();
    auto fail = [](const std::string& what) { return Ort::Status(("DcmhaAttention: " + what).c_str(), ORT_INVALID_ARGUMENT); };
    if (qs.size() != 4) return fail("q must be [B,T,N,d], got " + shape_str(qs));
    const int64_t B = qs[0], T = qs[1], N = qs[2], d = qs[3];
    if (ks.size() != 4 || ks[0] != B || ks[2] != N || ks[3] != d)
      return fail("k must be [B,S,N,d] matching q " + shape_str(qs) + ", got " + shape_str(ks));
    const int64_t S = ks[1];
    const auto& vs = v.Shape();
    if (vs.size() != 4 || vs[0] != B || vs[1] != S || vs[2] != N)
      return fail("v must be [B,S,N,dv] matching k " + shape_str(ks) + ", got " + shape_str(vs));
    const int64_t dv = vs[3];
    if (qfs.size() != 5 || qfs[0] != B || qfs[1] != T || qfs[2] != 2 || qfs[4] != N || qfs[3] % 2 != 1)
      return fail("q_factors must be [B,T,2,2R+1,N], got " + shape_str(qfs));
    const int64_t F = qfs[3], R = (F - 1) / 2;
    if (kfs != std::vector<int64_t>{B, S, 2, F, N})
      return fail("k_factors must be [B,S,2,2R+1,N] = " + shape_str({B, S, 2, F, N}) + ", got " + shape_str(kfs));
    if (R > kMaxR) return fail("rank R = " + std::to_string(R) + " exceeds " + std::to_string(kMaxR));
    if (ms != std::vector<int64_t>{B, S}) return fail("key_padding_mask must be [B,S], got " + shape_str(ms));
    if (ws != std::vector<int64_t>{2, N, N}) return fail("static_mix must be [2,N,N], got " + shape_str(ws));
    if (window_ < 0) return fail("window must be >= 0");
    if (window_ > 0 && !causal_) return fail("window requires causal = 1");

    E* out = o.Allocate({B, T, N, dv});
    const size_t out_count = static_cast<size_t>(B * T * N * dv);
    if (out_count == 0) return Ort::Status{nullptr};
    if (S == 0) {
      std::fill(out, out + out_count, from_float<E>(0.f));
      return Ort::Status{nullptr};
    }

    Problem p;
    p.B = B, p.T = T, p.S = S, p.N = N, p.d = d, p.dv = dv, p.R = R;
    p.scale = scale_ != 0.f ? scale_ : static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
    p.causal = causal_, p.use_static = use_static_, p.window = window_;
    p.Sp = round_up(S, kCB), p.dvb = (dv + kCB - 1) / kCB, p.nqb = (T + kTq - 1) / kTq;

    // fp32 views of the inputs (converted copies for fp16 / bf16).
    std::vector<float> q32, qf32, wb32, out32;
    if constexpr (std::is_same_v<E, float>) {
      p.q = q.Data(), p.qf = q_factors.Data(), p.wb = static_mix.Data(), p.out = out;
    } else {
      q32 = to_float_vector(q.Data(), static_cast<size_t>(B * T * N * d));
      qf32 = to_float_vector(q_factors.Data(), static_cast<size_t>(B * T * 2 * F * N));
      wb32 = to_float_vector(static_mix.Data(), static_cast<size_t>(2 * N * N));
      out32.resize(out_count);
      p.q = q32.data(), p.qf = qf32.data(), p.wb = wb32.data(), p.out = out32.data();
    }
    std::vector<float> kt(static_cast<size_t>(B * N * d * p.Sp)), vp(static_cast<size_t>(B * N * p.dvb * p.Sp * kCB)),
        kf(static_cast<size_t>(B * 2 * F * N * p.Sp));
    std::vector<int32_t> pad(static_cast<size_t>(B * p.Sp), 0);
    std::vector<int64_t> count(static_cast<size_t>(B * (S + 1)), 0);
    const bool* mask = key_padding_mask.Data();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < S; ++s) {
        pad[b * p.Sp + s] = mask[b * S + s] ? 1 : 0;
        count[b * (S + 1) + s + 1] = count[b * (S + 1) + s] + pad[b * p.Sp + s];
      }
    p.kt = kt.data(), p.vp = vp.data(), p.kf = kf.data(), p.pad = pad.data(), p.count = count.data();

    Ort::KernelContext ctx(context);
    PackJob<E> pack{&p, k.Data(), v.Data(), k_factors.Data(), kt.data(), vp.data(), kf.data()};
    ctx.ParallelFor(pack_item<E>, static_cast<size_t>(B * N), 0, &pack);
    Job job{&p, block_fn(R)};
    ctx.ParallelFor(run_item, static_cast<size_t>(B * p.nqb), 0, &job);
    if (p.failed) return Ort::Status("DcmhaAttention: out of memory for the score panel", ORT_FAIL);

    if constexpr (!std::is_same_v<E, float>) {
      for (size_t i = 0; i < out_count; ++i) out[i] = from_float<E>(out32[i]);
    }
    return Ort::Status{nullptr};
  }
};

void make_ops(std::vector<OrtCustomOp*>& ops) {
  ops.push_back(Ort::Custom::CreateLiteCustomOp<DcmhaAttentionKernel<float>>("DcmhaAttention", kCpuEP));
  ops.push_back(Ort::Custom::CreateLiteCustomOp<DcmhaAttentionKernel<Ort::Float16_t>>("DcmhaAttention", kCpuEP));
  ops.push_back(Ort::Custom::CreateLiteCustomOp<DcmhaAttentionKernel<Ort::BFloat16_t>>("DcmhaAttention", kCpuEP));
}
ATTN2ONNX_REGISTER_OPS(make_ops);

}  // namespace
}  // namespace attn2onnx
