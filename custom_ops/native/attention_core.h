// The attention core shared by the attn2onnx CPU attention kernels (DcmhaAttention's blocked
// two-sweep kernel, StandardAttention's single-pass flash kernel): register-blocked micro-kernels
// for scores (Q K^T) and outputs (P V), the packed key / value layouts they stream, and the small
// helpers every attention kernel's shape checks use.
//
// Packed layouts (zero padded past S and past dv, so every micro-kernel streams whole vectors of
// contiguous memory: no 4 KiB-strided rows fighting over the same L1 sets):
//   keys   [Sp/kCB, d, kCB]   one head's keys, transposed per block of kCB keys (pack_head)
//   values [dvb, Sp, kCB]     one head's values, per block of kCB head dims
// with Sp = S rounded up to kCB and dvb = dv / kCB rounded up.
#pragma once

#include "attn2onnx_native.h"

#include <algorithm>
#include <string>
#include <vector>

namespace attn2onnx {

#if defined(__AVX512F__)
inline constexpr int kMR = 8;  // micro-tile rows; 2 * kMR accumulators + 3 live registers out of 32
#else
inline constexpr int kMR = 6;  // 12 accumulators + 3 out of 16
#endif
inline constexpr int kCB = 2 * kVL;  // micro-tile columns (keys for QK^T, head dims for PV)

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
inline void qk_rows(int64_t rows, const float* a, ptrdiff_t lda, const float* b, ptrdiff_t ldb, int64_t K, float* c,
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
inline void pv_rows(int64_t rows, const float* a, ptrdiff_t lda, const float* b, ptrdiff_t ldb, int64_t K, float* c,
             ptrdiff_t ldc, int ncols, bool accumulate) {
  if constexpr (MR > 0) {
    if (rows >= MR) {
      pv_tile<MR, NV>(a, lda, b, ldb, K, c, ldc, ncols, accumulate);
    } else {
      pv_rows<MR - 1, NV>(rows, a, lda, b, ldb, K, c, ldc, ncols, accumulate);
    }
  }
}

// ------------------------------------------------------------------ key ranges
// The keys query row t of a batch row may see from causal / window alone: [lo, hi] with the query
// at position t + S - T (aligned to the end of the keys); window W > 0 (with causal) keeps W keys
// including the query's own.
inline void row_keys(int64_t t, int64_t T, int64_t S, bool causal, int64_t window, int64_t& lo, int64_t& hi) {
  const int64_t pos = t + S - T;
  hi = causal ? std::min(S - 1, pos) : S - 1;
  lo = (causal && window > 0) ? std::max<int64_t>(0, pos - window + 1) : 0;
}

// Per row [lo, hi] of rows t0 .. t0+tn-1 and the key range [s_lo, s_hi) a block of them covers:
// the rows' union trimmed of keys that are padding for every row, or every key when some row sees
// none (its softmax is uniform over all S keys). pad [Sp]: 1 = real key; count [S+1]: prefix
// counts of real keys.
inline void block_keys(const int32_t* pad, const int64_t* count, int64_t T, int64_t S, bool causal, int64_t window,
                       int64_t t0, int64_t tn, int64_t* lo, int64_t* hi, int64_t& s_lo, int64_t& s_hi) {
  bool every_row_sees_a_key = true;
  s_lo = S, s_hi = 0;
  for (int64_t i = 0; i < tn; ++i) {
    row_keys(t0 + i, T, S, causal, window, lo[i], hi[i]);
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
}

// Key padding lanes and prefix counts of a [B,S] bool mask: pad [B,Sp] (1 = real key, 0 past S)
// and count [B,S+1].
inline void key_padding(const uint8_t* mask, int64_t B, int64_t S, int64_t Sp, std::vector<int32_t>& pad,
                        std::vector<int64_t>& count) {
  pad.assign(static_cast<size_t>(B * Sp), 0);
  count.assign(static_cast<size_t>(B * (S + 1)), 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      pad[b * Sp + s] = mask[b * S + s] ? 1 : 0;
      count[b * (S + 1) + s + 1] = count[b * (S + 1) + s] + pad[b * Sp + s];
    }
}

// ------------------------------------------------------------------ packing
// One head's keys and values into the packed layouts above: k / v point at the head's first key
// / value, consecutive keys `k_stride` / `v_stride` elements apart ([B,S,N,d] rows: N * d).
// kt holds Sp * d floats, vp dvb * Sp * kCB; the padding must be zero on entry.
template <typename E>
void pack_head(const E* k, int64_t k_stride, const E* v, int64_t v_stride, int64_t S, int64_t d, int64_t dv,
               int64_t Sp, float* kt, float* vp) {
  for (int64_t s = 0; s < S; ++s) {
    const E* ks = k + s * k_stride;
    const E* vs = v + s * v_stride;
    float* kdst = kt + (s / kCB) * d * kCB + s % kCB;
    for (int64_t j = 0; j < d; ++j) kdst[j * kCB] = to_float(ks[j]);
    for (int64_t j = 0; j < dv; ++j) vp[((j / kCB) * Sp + s) * kCB + j % kCB] = to_float(vs[j]);
  }
}

// ------------------------------------------------------------------ inputs and shapes
template <typename E>
inline std::vector<float> to_float_vector(const E* data, size_t count) {
  std::vector<float> out(count);
  for (size_t i = 0; i < count; ++i) out[i] = to_float(data[i]);
  return out;
}

// fp32 view of an input: the data itself for float, else a converted copy kept in `keep`.
template <typename E>
inline const float* float_view(const E* data, size_t count, std::vector<float>& keep) {
  if constexpr (std::is_same_v<E, float>) {
    return data;
  } else {
    keep = to_float_vector(data, count);
    return keep.data();
  }
}

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

// Elements of a tensor of `shape`, false when the count overflows int64.
inline bool element_count(const std::vector<int64_t>& shape, int64_t& count) {
  count = 1;
  for (int64_t dim : shape)
    if (__builtin_mul_overflow(count, dim, &count)) return false;
  return true;
}

}  // namespace attn2onnx
