// ai.attn2onnx::DcmhaAttention — fused DCMHA attention core, ONNX Runtime CPU kernel.
//
// Contract (custom_ops/README.md; v may have its own head dim dv): L = q k^T * scale; L = Compose(L, pre) on the unmasked logits;
// L = where(allowed, L, NEG); P = softmax(L) in fp32; P = Compose(P, post); o = P v.
// Compose on the head vector a at (t,s): a + (a U_t^T) V_t + (a U_s^T) V_s + a*g_t + a*g_s (+ a Wb).
//
// Blocked path (T > kDirectMaxT; exact, no [B,N,T,S] buffer): one work item = (batch, block of tq
// query rows), run on ORT's intra-op thread pool. A work item keeps the scores of all N heads of
// its rows over the key range they can see (a [tq, N, W] panel in thread-local scratch, W <= S),
// so every (t,s) has all its heads at hand for the head-mixing composes. Two sweeps over the
// keys, chunk by chunk (a chunk's scores, all heads, stay in L2 between the steps):
//   pass 1, per chunk: 1. QK^T for every head (register-blocked micro-kernel, keys packed, the
//     block's query rows packed head by head); then row by row (a row's chunk, all heads, stays
//     in L1 between the two steps): 2. pre-compose in place on the unmasked logits, then mask
//     (causal / local window / key padding) with NEG; 3. e = exp(L - chunk max) in place (a
//     polynomial exp the vector units run), chunk sums (fp32).
//   between: row max m and sum l over the chunks (exact online-softmax rescaling: chunk c's
//     probabilities are e * exp(m_c - m) / l).
//   pass 2, per chunk: 4. normalise and post-compose in place (the contract composes normalised
//     probabilities); 5. o += P v for every head (register-blocked micro-kernel, values packed).
// QK^T is computed once (a flash-style scheme that keeps no panel would compute it twice, because
// the post-compose needs the final normalisers of every head: one pass would need N * N * dv
// accumulators per row); the panel costs O(N * tq * S) per thread. Memory bound (plan_blocks,
// per call from S and N): tq = kTq (64 with AVX-512, 48 otherwise: K and V are streamed once per
// block, so larger blocks read them less often) while the panel fits the per-thread budget
// (20 MiB: every S <= 4096 at N = 8, S <= 2048 at N = 32), else fewer rows in whole micro-tiles
// (32 at N = 32, S = 4096), and below kMR rows a tiled panel instead: one chunk wide, steps 1-3 run again in pass 2 (the
// same operations, so the same bits), keeping the scratch O(N * tq * (kChunk + S / kChunk)).
// ATTN2ONNX_DCMHA_SCRATCH_BYTES (bytes, read when a session creates the kernel) sets another
// budget: the tests lower it to reach the small-block and tiled plans at small S.
// Keys that no row of the block can see (causal, window, padding) are skipped: a masked
// (t,s) has probability 0 in every head (the mask is shared by the heads), and compose maps a zero
// head vector to zero, so skipped keys contribute nothing. A row that sees no key at all is a
// softmax over S entries of NEG (uniform), so a block holding such a row keeps the full key range.
//
// Optional attn_mask (bool [T,S] or [B,N,T,S], any axis 1 = broadcast; read in place through
// strides, 0 on a broadcast axis): ANDed into `allowed` in step 2, where causal / window / padding
// are applied, per head when the mask has a head axis. The key ranges and the skipping of keys
// then come from a per-row scan of the mask (mask_rows): a key no head of a row may see is skipped,
// and a row that sees no key in some head keeps the full key range (uniform over all S keys).
// Without the input nothing of this runs: the results are the bits of the plain kernel.
//
// Direct path (T <= kDirectMaxT: a decode step or a few rows): packing K and V would cost more
// than attending a few rows, so keys and values are read in place ([B,S,N,d], dot products and
// axpys); all T rows go together, and the key range is cut into kSplitKeys-key splits that are
// the work items, so that one sequence (B = 1) still keeps every thread busy. The same steps on a
// global grid of kChunk-key chunks: phase 1 = steps 1-3 per split into shared [B,T,N,S] scores
// and per-chunk stats; the row max and 1 / l merged over all chunks; phase 2 = steps 4-5 per
// split into a partial output per split; the partials summed in split order.
// Work items are independent, their division depends on the shapes only, and each row is computed
// in one fixed order: any thread count gives bit-identical results.
#include "attention_core.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>

namespace attn2onnx {
namespace {

constexpr int kTq = 8 * kMR;     // query rows per work item, at most
constexpr int kChunk = 4 * kCB;  // keys per chunk: a chunk's scores, all heads, stay in L2
constexpr int kMaxR = 16;
constexpr int64_t kDirectMaxT = 8;   // T <= this: the direct path (no packing, key range split)
constexpr int64_t kSplitKeys = 256;  // keys per work item of the direct path
static_assert(kSplitKeys % kChunk == 0 && kDirectMaxT <= kTq, "direct-path splits are whole chunks");
constexpr size_t kDefaultScratchBytes = size_t{20} << 20;  // per-thread scratch budget of the blocked path

struct Problem {
  int64_t B, T, S, N, d, dv, R;  // d: q/k head dim, dv: v head dim
  float scale;
  bool causal, use_static;
  int64_t window;
  int64_t Sp, dvb;       // Sp: S rounded up to kCB; dvb: dv / kCB rounded up
  int64_t tq, nqb;       // blocked path: query rows per work item, blocks per batch row
  bool tiled;            // blocked path: one-chunk panel recomputed in pass 2
  int64_t Sld, nch, nsplit;  // direct path: score row stride, key chunks, key splits
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
  // Optional attn_mask: element (b, n, t, s) at am[b*am_b + n*am_n + t*am_t + s*am_s]; null when absent.
  const uint8_t* am = nullptr;
  int64_t am_b = 0, am_n = 0, am_t = 0, am_s = 0;
  const int64_t* mfirst;  // [B,T]  with am: first key any head of the row may see (S: none)
  const int64_t* mlast;   // [B,T]  with am: last such key (-1: none)
  const uint8_t* mblind;  // [B,T]  with am: 1 when the row sees no key in some head
  float* out;            // [B,T,N,dv]
  // Direct path: inputs in place (fp32) and the buffers the phases share.
  const float* kd;       // [B,S,N,d]
  const float* vd;       // [B,S,N,dv]
  const float* kfd;      // [B,S,2,2R+1,N]
  float* scores;         // [B,T,N,Sld]
  float* cmax;           // [B,T,nch,N]  chunk max
  float* csum;           // [B,T,nch,N]  chunk sum of exp(L - chunk max)
  float* rowm;           // [B,T,N]      row max
  float* rowinv;         // [B,T,N]      1 / row sum
  float* part;           // [B,nsplit,T,N,dv]  each split's share of o
  std::atomic<bool> failed{false};
};

// ------------------------------------------------------------------ attn_mask
// attn_mask lanes (-1 = may attend) of keys s .. s + kVL - 1 for batch b, head n, query row t; 0 past S.
inline vi mask_bits(const Problem& p, int64_t b, int64_t n, int64_t t, int64_t s) {
  const uint8_t* row = p.am + b * p.am_b + n * p.am_n + t * p.am_t;
  if (p.am_s == 1 && s + kVL <= p.S) {
    typedef uint8_t vb __attribute__((vector_size(kVL)));
    vb raw;
    std::memcpy(&raw, row + s, sizeof raw);
    return __builtin_convertvector(raw, vi) != 0;
  }
  int32_t lanes[kVL];
  for (int l = 0; l < kVL; ++l) lanes[l] = (s + l < p.S && row[(s + l) * p.am_s]) ? -1 : 0;
  vi v;
  std::memcpy(&v, lanes, sizeof v);
  return v;
}

// `allowed` (causal / window / padding) of one key group ANDed with the head-shared attn_mask;
// the per-head part, when the mask has a head axis, is head_allowed's.
inline vi shared_allowed(const Problem& p, vi allowed, int64_t b, int64_t t, int64_t s) {
  return p.am != nullptr && p.am_n == 0 ? allowed & mask_bits(p, b, 0, t, s) : allowed;
}
inline vi head_allowed(const Problem& p, vi shared, int64_t b, int64_t n, int64_t t, int64_t s) {
  return p.am != nullptr && p.am_n != 0 ? shared & mask_bits(p, b, n, t, s) : shared;
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

// ------------------------------------------------------------------ work plan
// Blocked path: how many query rows a work item takes and whether its panel holds the whole key
// range or one recomputed chunk, chosen per call from S and N so that a thread's scratch stays
// within the budget. The full panel with kTq rows is kept whenever it fits; then fewer rows, in
// whole micro-tiles down to kMR (at N = 32, S = 4096 under the default 20 MiB: 32 rows, 16.4 MiB
// with 16-float padding); below kMR rows (where the micro-kernels lose their register blocking)
// the tiled panel with as many rows as fit instead.
struct BlockPlan {
  int64_t rows;  // query rows per work item (<= kTq)
  bool tiled;    // panel of one key chunk, recomputed in pass 2 (steps 1-3 run twice)
  size_t bytes;  // per-thread scratch of a work item, at most
};

// Floats of per-thread scratch for `rows` query rows, `cols` panel columns and `nch` key chunks
// (the layout of run_block: panel, chunk max vectors, held vectors and alignment, chunk stats).
size_t block_scratch_floats(int64_t rows, int64_t N, int64_t cols, int64_t nch) {
  return static_cast<size_t>(rows * N * (cols + kVL) + (2 * N + 1) * kVL + 2 * nch * rows * N);
}

BlockPlan plan_blocks(int64_t S, int64_t N, size_t budget) {
  const int64_t Wp = round_up(S, kCB), nch = (Wp + kChunk - 1) / kChunk;  // W <= S in every block
  auto most_rows = [&](bool tiled) {
    const int64_t cols = tiled ? kChunk : Wp;
    BlockPlan plan{1, tiled, 0};
    for (int64_t rows = kTq; rows >= 1; rows -= rows > kMR ? kMR : 1) {  // whole micro-tiles down to kMR
      plan = {rows, tiled, sizeof(float) * block_scratch_floats(rows, N, cols, nch)};
      if (plan.bytes <= budget) break;
    }
    return plan;
  };
  const BlockPlan full = most_rows(false);
  return full.bytes <= budget && full.rows >= kMR ? full : most_rows(true);
}

// Keys rows t0 .. t0+tn-1 of batch b may see: per row [lo, hi] from causal / window (query t
// sits at t + S - T), and the range [s_lo, s_hi) a work item covers: their union trimmed of keys
// that are padding for every row, or every key when some row sees none (its softmax is uniform
// over all S entries).
void key_ranges(const Problem& p, int64_t b, int64_t t0, int64_t tn, int64_t* lo, int64_t* hi, int64_t& s_lo,
                int64_t& s_hi) {
  const int64_t S = p.S;
  if (p.am != nullptr) {  // attn_mask: the union of the rows' scanned ranges, every key if one is blind
    s_lo = S, s_hi = 0;
    bool blind = false;
    for (int64_t i = 0; i < tn; ++i) {
      const int64_t row = b * p.T + t0 + i;
      row_keys(t0 + i, p.T, S, p.causal, p.window, lo[i], hi[i]);
      blind = blind || p.mblind[row];
      s_lo = std::min(s_lo, p.mfirst[row]);
      s_hi = std::max(s_hi, p.mlast[row] + 1);
    }
    if (blind) s_lo = 0, s_hi = S;
    return;
  }
  block_keys(p.pad + b * p.Sp, p.count + b * (S + 1), p.T, S, p.causal, p.window, t0, tn, lo, hi, s_lo, s_hi);
}

// ------------------------------------------------------------------ one work item (blocked path)
template <int RT>
void run_block(const Problem& p, int64_t item) {
  const int64_t N = p.N, d = p.d, R = p.R, F = 2 * p.R + 1, T = p.T, Sp = p.Sp, tq = p.tq;
  const int64_t b = item / p.nqb, qb = p.nqb - 1 - item % p.nqb;  // heavy (late) causal blocks first
  const int64_t t0 = qb * tq, tn = std::min<int64_t>(tq, T - t0);
  const int32_t* pad = p.pad + b * Sp;

  int64_t lo[kTq], hi[kTq], s_lo, s_hi;
  key_ranges(p, b, t0, tn, lo, hi, s_lo, s_hi);
  s_lo = s_lo / kCB * kCB;  // so that s_lo + Wp <= Sp
  const int64_t W = s_hi - s_lo, Wp = round_up(W, kCB);

  // Scratch: scores [tq, N, Wld] | chunk max vectors [N] | held [N] vectors | per-chunk row
  // max and sum, then scale [nch, tq, N] each. The panel holds every key of the range, or
  // (tiled) one chunk: key column c of chunk ci sits at column c - off(ci).
  // Wld = cols + kVL: consecutive heads' rows never sit a multiple of 4 KiB apart.
  const int64_t nch = (Wp + kChunk - 1) / kChunk, cols = p.tiled ? kChunk : Wp, Wld = cols + kVL;
  const size_t panel = static_cast<size_t>(N * tq * Wld);
  float* scratch = thread_scratch(block_scratch_floats(tq, N, cols, nch));
  float* L = scratch;
  uintptr_t base = reinterpret_cast<uintptr_t>(scratch + panel);  // vf-aligned vector arrays
  base = (base + sizeof(vf) - 1) / sizeof(vf) * sizeof(vf);
  vf* maxv = reinterpret_cast<vf*>(base);
  vf* held = maxv + N;
  float* chunk_max = reinterpret_cast<float*>(held + N);  // [nch, tq, N]
  float* chunk_scale = chunk_max + nch * tq * N;         // [nch, tq, N]: sums, then exp(m_c - m) / l
  auto row = [&](int64_t n, int64_t i) { return L + (i * N + n) * Wld; };
  auto off = [&](int64_t ci) { return p.tiled ? ci * kChunk : 0; };
  auto stat = [&](float* a, int64_t ci, int64_t i, int64_t n) -> float& { return a[(ci * tq + i) * N + n]; };

  const float* wb_pre = p.use_static ? p.wb : nullptr;
  const float* wb_post = p.use_static ? p.wb + N * N : nullptr;
  // key factors of key s_lo + c: kf_slot + c * F * N (c a multiple of kVL); (row, n) at (row*N + n)*kVL
  const float* kf_pre = p.kf + ((b * 2 + 0) * (Sp / kVL) + s_lo / kVL) * F * N * kVL;
  const float* kf_post = p.kf + ((b * 2 + 1) * (Sp / kVL) + s_lo / kVL) * F * N * kVL;
  const vi iota = viota();
  // The block's query rows, head by head ([N, tn, d]): the micro-kernel's rows then sit d floats
  // apart, not N * d (rows 2 KiB apart fall into two L1 sets and evict each other).
  float* qpack = thread_scratch(static_cast<size_t>(N * tn * d), 1);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < tn; ++i)
      std::memcpy(qpack + (n * tn + i) * d, p.q + ((b * T + t0 + i) * N + n) * d, sizeof(float) * d);

  // Steps 1-3 on one chunk of kChunk keys (its scores stay in L2 throughout): scores,
  // pre-compose, mask, chunk max, exp(L - chunk max) and (keep_stats) chunk max and sum.
  auto exp_scores = [&](int64_t ci, bool keep_stats) {
    const int64_t c0 = ci * kChunk, c1 = std::min<int64_t>(Wp, c0 + kChunk), o = off(ci);
    // 1. scores = scale * q k^T, every head.
    for (int64_t n = 0; n < N; ++n) {
      const float* kb = p.kt + ((b * N + n) * (Sp / kCB) + s_lo / kCB) * d * kCB;
      const float* qa = qpack + n * tn * d;
      for (int64_t j = c0; j < c1; j += kCB)
        for (int64_t i = 0; i < tn; i += kMR)
          qk_rows<kMR>(tn - i, qa + i * d, d, kb + j * d, kCB, d, row(n, i) + j - o, N * Wld, p.scale);
    }
    // 2-3, row by row (the row's chunk, all heads, stays in L1 between the steps):
    // 2. pre-compose (slot 0) on the unmasked logits, then mask, tracking the max;
    // 3. exp(L - chunk max) and chunk sums over the W real columns; padded columns become 0.
    const int64_t c_full = std::min(c1, W / kVL * kVL);  // groups below it hold no padded column
    for (int64_t i = 0; i < tn; ++i) {
      for (int64_t n = 0; n < N; ++n) maxv[n] = vset1(kNeg);
      const float* qfs = p.qf + ((b * T + t0 + i) * 2 + 0) * F * N;
      for (int64_t c = c0; c < c1; c += kVL) {
        const vi s = iota + static_cast<int32_t>(s_lo + c);
        vi real;
        std::memcpy(&real, pad + s_lo + c, sizeof real);
        const vi allowed = shared_allowed(
            p, (s >= static_cast<int32_t>(lo[i])) & (s <= static_cast<int32_t>(hi[i])) & (real != 0), b, t0 + i, s_lo + c);
        float* a = row(0, i) + c - o;
        compose_group<RT>(a, Wld, N, R, qfs, kf_pre + c * F * N, kVL, wb_pre, nullptr, held, [&](int64_t n, vf x) {
          x = head_allowed(p, allowed, b, n, t0 + i, s_lo + c) ? x : vset1(kNeg);
          vstore(a + n * Wld, x);
          maxv[n] = vmax(maxv[n], x);
        });
      }
      for (int64_t n = 0; n < N; ++n) {
        float* r = row(n, i) - o;
        const float m = hmax(maxv[n]);
        const vf mv = vset1(m);
        vf sum = vf{};
        int64_t c = c0;
        for (; c < c_full; c += kVL) {
          const vf e = vexp_nonpos(vload(r + c) - mv);
          vstore(r + c, e);
          sum += e;
        }
        for (; c < c1; c += kVL) {
          vf e = vexp_nonpos(vload(r + c) - mv);
          e = (iota + static_cast<int32_t>(c)) < static_cast<int32_t>(W) ? e : vf{};
          vstore(r + c, e);
          sum += e;
        }
        if (keep_stats) {
          stat(chunk_max, ci, i, n) = m;
          stat(chunk_scale, ci, i, n) = hsum(sum);
        }
      }
    }
  };

  // Pass 1: steps 1-3 chunk by chunk.
  for (int64_t ci = 0; ci < nch; ++ci) exp_scores(ci, true);

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

  // Pass 2, chunk by chunk (tiled: steps 1-3 again, bit-identical): normalise and post-compose
  // (slot 1), then accumulate P v.
  const int64_t dv = p.dv;
  for (int64_t ci = 0; ci < nch; ++ci) {
    if (p.tiled) exp_scores(ci, false);
    const int64_t c0 = ci * kChunk, c1 = std::min<int64_t>(Wp, c0 + kChunk), o = off(ci);
    // 4. probabilities (normalised on load) post-composed in place.
    for (int64_t i = 0; i < tn; ++i) {
      const float* qfs = p.qf + ((b * T + t0 + i) * 2 + 1) * F * N;
      const float* norm = &stat(chunk_scale, ci, i, 0);
      for (int64_t c = c0; c < c1; c += kVL) {
        float* a = row(0, i) + c - o;
        compose_group<RT>(a, Wld, N, R, qfs, kf_post + c * F * N, kVL, wb_post, norm, held,
                          [&](int64_t n, vf x) { vstore(a + n * Wld, x); });
      }
    }
    // 5. o (+)= P v over the chunk, every head, straight into the output rows.
    const bool accumulate = ci > 0;
    for (int64_t n = 0; n < N; ++n) {
      const float* vb = p.vp + (b * N + n) * p.dvb * Sp * kCB + (s_lo + c0) * kCB;
      float* ob = p.out + ((b * T + t0) * N + n) * dv;
      for (int64_t i = 0; i < tn; i += kMR) {
        const float* pa = row(n, i) + c0 - o;
        for (int64_t dc = 0; dc < dv; dc += kCB) {
          const int ncols = static_cast<int>(std::min<int64_t>(kCB, dv - dc));
          float* c = ob + i * N * dv + dc;
          if (ncols > kVL) {
            pv_rows<kMR, 2>(tn - i, pa, N * Wld, vb + dc * Sp, kCB, c1 - c0, c, N * dv, ncols, accumulate);
          } else {
            pv_rows<kMR, 1>(tn - i, pa, N * Wld, vb + dc * Sp, kCB, c1 - c0, c, N * dv, ncols, accumulate);
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------ direct path (a few query rows)
inline float dot(const float* a, const float* b, int64_t n) {
  vf acc = vf{};
  int64_t j = 0;
  for (; j + kVL <= n; j += kVL) acc += vload(a + j) * vload(b + j);
  float s = hsum(acc);
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

inline void axpy(float* y, float w, const float* x, int64_t n) {  // y += w x
  const vf wv = vset1(w);
  int64_t j = 0;
  for (; j + kVL <= n; j += kVL) vstore(y + j, vload(y + j) + wv * vload(x + j));
  for (; j < n; ++j) y[j] += w * x[j];
}

// Key factors of one slot for keys [s0, s1) of batch b (s0 a multiple of kVL) into dst as
// [(s - s0) / kVL, F, N, kVL]: all heads' factors of a key group sit together.
template <typename E>
void pack_factors(const E* kf, int64_t b, int64_t slot, int64_t s0, int64_t s1, int64_t S, int64_t F, int64_t N,
                  float* dst) {
  for (int64_t s = s0; s < s1; ++s)
    for (int64_t r = 0; r < F; ++r)
      for (int64_t h = 0; h < N; ++h)
        dst[(((s - s0) / kVL * F + r) * N + h) * kVL + (s - s0) % kVL] =
            to_float(kf[(((b * S + s) * 2 + slot) * F + r) * N + h]);
}

// Per-thread scratch of a direct work item: one chunk's key factors, T*N max and N held vectors
// (plus alignment), T*N normalisers.
size_t direct_scratch_floats(int64_t T, int64_t N, int64_t F) {
  return static_cast<size_t>(kChunk * F * N + (T * N + N + 1) * kVL + T * N);
}

// What a direct work item (batch b, split j) works on: the rows' key ranges, its chunks, views.
struct DirectItem {
  int64_t b, j, ci0, ci1, s_lo, s_hi;
  int64_t lo[kDirectMaxT], hi[kDirectMaxT];
  float* kfs;   // [kChunk / kVL, F, N, kVL]
  vf* maxv;     // [T*N]
  vf* held;     // [N]
  float* norm;  // [T*N]

  DirectItem(const Problem& p, int64_t item) : b(item / p.nsplit), j(item % p.nsplit) {
    constexpr int64_t per = kSplitKeys / kChunk;
    ci0 = j * per, ci1 = std::min(p.nch, ci0 + per);
    key_ranges(p, b, 0, p.T, lo, hi, s_lo, s_hi);
    float* scratch = thread_scratch(direct_scratch_floats(p.T, p.N, 2 * p.R + 1));
    kfs = scratch;
    uintptr_t base = reinterpret_cast<uintptr_t>(scratch + kChunk * (2 * p.R + 1) * p.N);
    base = (base + sizeof(vf) - 1) / sizeof(vf) * sizeof(vf);
    maxv = reinterpret_cast<vf*>(base);
    held = maxv + p.T * p.N;
    norm = reinterpret_cast<float*>(held + p.N);
  }
  bool skipped(int64_t c0, int64_t c1) const { return c1 <= s_lo || c0 >= s_hi; }
  float* scores(const Problem& p, int64_t t, int64_t n) const { return p.scores + ((b * p.T + t) * p.N + n) * p.Sld; }
  int64_t stat(const Problem& p, int64_t t, int64_t ci) const { return ((b * p.T + t) * p.nch + ci) * p.N; }
  // This split's key factors of `slot` for the chunk [c0, c1) into kfs, zero past S.
  void factors(const Problem& p, int64_t slot, int64_t c0, int64_t c1) const {
    const int64_t F = 2 * p.R + 1, se = std::min(p.S, c1);
    if (se < c1) std::fill(kfs, kfs + kChunk * F * p.N, 0.f);
    pack_factors(p.kfd, b, slot, c0, se, p.S, F, p.N, kfs);
  }
};

// Phase 1 of the direct path: steps 1-3 on the split's chunks, chunk stats into p.cmax / p.csum.
template <int RT>
void direct_scores(const Problem& p, int64_t item) {
  const int64_t N = p.N, d = p.d, F = 2 * p.R + 1, T = p.T, S = p.S;
  const DirectItem w(p, item);
  const int32_t* pad = p.pad + w.b * p.Sp;
  const float* wb_pre = p.use_static ? p.wb : nullptr;
  const vi iota = viota();
  for (int64_t ci = w.ci0; ci < w.ci1; ++ci) {
    const int64_t c0 = ci * kChunk, c1 = std::min(p.Sp, c0 + kChunk), se = std::min(S, c1);
    if (w.skipped(c0, c1)) {  // no row sees these keys: scale exactly 0 after the merge
      for (int64_t t = 0; t < T; ++t) {
        std::fill(p.cmax + w.stat(p, t, ci), p.cmax + w.stat(p, t, ci) + N, kNeg);
        std::fill(p.csum + w.stat(p, t, ci), p.csum + w.stat(p, t, ci) + N, 0.f);
      }
      continue;
    }
    // 1. scores = scale * q k^T, every head, keys read in place (0 past S).
    for (int64_t s = c0; s < c1; ++s)
      for (int64_t n = 0; n < N; ++n) {
        const float* ks = p.kd + ((w.b * S + s) * N + n) * d;
        for (int64_t t = 0; t < T; ++t)
          w.scores(p, t, n)[s] = s < S ? dot(p.q + ((w.b * T + t) * N + n) * d, ks, d) * p.scale : 0.f;
      }
    // 2. pre-compose (slot 0) on the unmasked logits, then mask, tracking the max.
    w.factors(p, 0, c0, c1);
    for (int64_t x = 0; x < N * T; ++x) w.maxv[x] = vset1(kNeg);
    for (int64_t t = 0; t < T; ++t) {
      const float* qfs = p.qf + ((w.b * T + t) * 2 + 0) * F * N;
      for (int64_t c = c0; c < c1; c += kVL) {
        const vi s = iota + static_cast<int32_t>(c);
        vi real;
        std::memcpy(&real, pad + c, sizeof real);
        const vi allowed = shared_allowed(
            p, (s >= static_cast<int32_t>(w.lo[t])) & (s <= static_cast<int32_t>(w.hi[t])) & (real != 0), w.b, t, c);
        float* a = w.scores(p, t, 0) + c;
        compose_group<RT>(a, p.Sld, N, p.R, qfs, w.kfs + (c - c0) * F * N, kVL, wb_pre, nullptr, w.held,
                          [&](int64_t n, vf x) {
                            x = head_allowed(p, allowed, w.b, n, t, c) ? x : vset1(kNeg);
                            vstore(a + n * p.Sld, x);
                            w.maxv[t * N + n] = vmax(w.maxv[t * N + n], x);
                          });
      }
    }
    // 3. exp(L - chunk max) and chunk sums; columns past S become 0.
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < N; ++n) {
        float* r = w.scores(p, t, n);
        const float m = hmax(w.maxv[t * N + n]);
        vf sum = vf{};
        for (int64_t c = c0; c < c1; c += kVL) {
          vf e = vexp_nonpos(vload(r + c) - vset1(m));
          e = (iota + static_cast<int32_t>(c)) < static_cast<int32_t>(se) ? e : vf{};
          vstore(r + c, e);
          sum += e;
        }
        p.cmax[w.stat(p, t, ci) + n] = m;
        p.csum[w.stat(p, t, ci) + n] = hsum(sum);
      }
  }
}

// Between the phases (one thread): each row's max m and 1 / l over all its chunks.
void direct_merge(const Problem& p) {
  for (int64_t bt = 0; bt < p.B * p.T; ++bt)
    for (int64_t n = 0; n < p.N; ++n) {
      const float* cm = p.cmax + bt * p.nch * p.N + n;
      const float* cs = p.csum + bt * p.nch * p.N + n;
      float m = kNeg;
      for (int64_t ci = 0; ci < p.nch; ++ci) m = std::max(m, cm[ci * p.N]);
      float l = 0.f;
      for (int64_t ci = 0; ci < p.nch; ++ci) l += cs[ci * p.N] * std::exp(cm[ci * p.N] - m);
      p.rowm[bt * p.N + n] = m;
      p.rowinv[bt * p.N + n] = 1.f / l;
    }
}

// Phase 2 of the direct path: steps 4-5 on the split's chunks into its partial output.
template <int RT>
void direct_apply(const Problem& p, int64_t item) {
  const int64_t N = p.N, dv = p.dv, F = 2 * p.R + 1, T = p.T, S = p.S;
  const DirectItem w(p, item);
  const float* wb_post = p.use_static ? p.wb + N * N : nullptr;
  float* part = p.part + (w.b * p.nsplit + w.j) * T * N * dv;  // [T, N, dv]
  for (int64_t ci = w.ci0; ci < w.ci1; ++ci) {
    const int64_t c0 = ci * kChunk, c1 = std::min(p.Sp, c0 + kChunk);
    if (w.skipped(c0, c1)) continue;
    // 4. probabilities (normalised on load: exp(m_c - m) / l) post-composed in place.
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < N; ++n) {
        const int64_t row = (w.b * T + t) * N + n;
        w.norm[t * N + n] = std::exp(p.cmax[w.stat(p, t, ci) + n] - p.rowm[row]) * p.rowinv[row];
      }
    w.factors(p, 1, c0, c1);
    for (int64_t t = 0; t < T; ++t) {
      const float* qfs = p.qf + ((w.b * T + t) * 2 + 1) * F * N;
      for (int64_t c = c0; c < c1; c += kVL) {
        float* a = w.scores(p, t, 0) + c;
        compose_group<RT>(a, p.Sld, N, p.R, qfs, w.kfs + (c - c0) * F * N, kVL, wb_post, w.norm + t * N, w.held,
                          [&](int64_t n, vf x) { vstore(a + n * p.Sld, x); });
      }
    }
    // 5. part += P v over the chunk's real keys, values read in place.
    for (int64_t s = c0; s < std::min(S, c1); ++s)
      for (int64_t n = 0; n < N; ++n) {
        const float* vs = p.vd + ((w.b * S + s) * N + n) * dv;
        for (int64_t t = 0; t < T; ++t) axpy(part + (t * N + n) * dv, w.scores(p, t, n)[s], vs, dv);
      }
  }
}

using ItemFn = void (*)(const Problem&, int64_t);
struct Fns {
  ItemFn block, scores, apply;  // blocked work item; direct path phases 1 and 2
};
template <int RT>
constexpr Fns fns_for() {
  return {run_block<RT>, direct_scores<RT>, direct_apply<RT>};
}
Fns kernel_fns(int64_t R) {
  switch (R) {
    case 0: return fns_for<0>();
    case 1: return fns_for<1>();
    case 2: return fns_for<2>();
    case 3: return fns_for<3>();
    case 4: return fns_for<4>();
    default: return fns_for<-1>();
  }
}

struct Job {
  Problem* p;
  ItemFn fn;
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
  pack_head(job->k + (b * S * N + n) * d, N * d, job->v + (b * S * N + n) * dv, N * dv, S, d, dv, Sp, kt, vp);
  if (n == 0) {  // all heads' factors of a key group sit together: one item per batch does them
    for (int64_t slot = 0; slot < 2; ++slot)
      pack_factors(job->kf, b, slot, 0, S, S, F, N, job->kfp + (b * 2 + slot) * (Sp / kVL) * F * N * kVL);
  }
}

// The blocked path's per-thread scratch budget in bytes: ATTN2ONNX_DCMHA_SCRATCH_BYTES (a positive
// integer; documented in the header comment) or the 20 MiB default.
size_t scratch_budget() {
  const char* given = std::getenv("ATTN2ONNX_DCMHA_SCRATCH_BYTES");
  if (given != nullptr && *given != '\0') {
    char* end = nullptr;
    const unsigned long long bytes = std::strtoull(given, &end, 10);
    if (*end == '\0' && bytes > 0) return static_cast<size_t>(bytes);
  }
  return kDefaultScratchBytes;
}

// attn_mask's layout: strides (elements) over [B,N,T,S], 0 on broadcast axes, from its shape
// [T,S] or [B,N,T,S] (every axis its size or 1).
struct MaskView {
  int64_t stride[4] = {0, 0, 0, 0};
  int64_t heads = 1;  // heads the mask distinguishes (1 or N)

  bool read(const std::vector<int64_t>& shape, const std::vector<int64_t>& full) {
    if (shape.size() != 2 && shape.size() != 4) return false;
    const size_t lead = 4 - shape.size();  // [T,S] is [1,1,T,S]
    int64_t step = 1;
    for (size_t axis = 4; axis-- > lead;) {
      const int64_t size = shape[axis - lead];
      if (size != 1 && size != full[axis]) return false;
      stride[axis] = size == 1 ? 0 : step;
      step *= size;
    }
    heads = stride[1] != 0 ? full[1] : 1;
    return true;
  }
};

// Per row (b, t) of an attn_mask problem: the first and last key any head may see (causal /
// window / padding and the mask together) and whether some head sees none, for key_ranges.
// Each head's row is searched from both ends of [lo, hi] for its first and last visible key, so
// a mask that lets most keys through costs O(1) per row and head, not a scan of all S keys
// (the one serial phase of a long-T call with a mask before).
void mask_rows(Problem& p, int64_t heads, std::vector<int64_t>& first, std::vector<int64_t>& last,
               std::vector<uint8_t>& blind) {
  const int64_t B = p.B, T = p.T, S = p.S;
  first.assign(static_cast<size_t>(B * T), S), last.assign(static_cast<size_t>(B * T), -1);
  blind.assign(static_cast<size_t>(B * T), 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row = b * T + t;
      int64_t lo, hi;
      row_keys(t, T, S, p.causal, p.window, lo, hi);
      for (int64_t n = 0; n < heads; ++n) {
        const uint8_t* m = p.am + b * p.am_b + n * p.am_n + t * p.am_t;
        auto visible = [&](int64_t s) { return p.pad[b * p.Sp + s] && m[s * p.am_s]; };
        int64_t f = lo;
        while (f <= hi && !visible(f)) ++f;
        if (f > hi) {  // this head sees no key of the row
          blind[row] = 1;
          continue;
        }
        int64_t l = hi;
        while (!visible(l)) --l;  // stops at f at the latest
        first[row] = std::min(first[row], f);
        last[row] = std::max(last[row], l);
      }
    }
  p.mfirst = first.data(), p.mlast = last.data(), p.mblind = blind.data();
}

// ------------------------------------------------------------------ the ORT kernel
constexpr const char* kOp = "DcmhaAttention";
constexpr const char* kInputNames[] = {"q",        "k",        "v",          "q_factors",
                                       "k_factors", "key_padding_mask", "static_mix", "attn_mask"};
constexpr size_t kInputs = 8, kKeyPaddingMask = 5, kAttnMask = 7;  // attn_mask: the one optional input
// The kernel's int32 key / row lanes hold every index up to S rounded up to kCB.
constexpr int64_t kMaxLength = INT32_MAX - kCB;

template <typename E>
struct DcmhaAttentionKernel {
  float scale_ = 0.f;
  int64_t causal_ = 0, use_static_ = 0, window_ = 0;
  size_t budget_ = scratch_budget();

  // The node's attributes; a wrong type is an INVALID_ARGUMENT status when the session is created.
  Ort::Status read_attributes(const OrtApi* api, const OrtKernelInfo* info) {
    ATTN2ONNX_RETURN_IF_ERROR(read_attr(api, info, kOp, "scale", scale_));
    ATTN2ONNX_RETURN_IF_ERROR(read_attr(api, info, kOp, "causal", causal_));
    ATTN2ONNX_RETURN_IF_ERROR(read_attr(api, info, kOp, "use_static_mix", use_static_));
    return read_attr(api, info, kOp, "window", window_);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const noexcept {
    return status_of(kOp, [&] { return compute(Ort::KernelContext(context)); });
  }

  // Every input read and checked (read_input: an absent required input is an error, never a null
  // dereference), then run.
  Ort::Status compute(Ort::KernelContext ctx) const {
    auto tensor = [&](size_t i, Input<E>& in) { return read_input(ctx, i, kOp, kInputNames[i], onnx_type<E>(), true, in); };
    auto mask = [&](size_t i, Input<uint8_t>& in) {
      return read_input(ctx, i, kOp, kInputNames[i], ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL, i != kAttnMask, in);
    };
    Input<E> q, k, v, q_factors, k_factors, static_mix;
    Input<uint8_t> key_padding_mask, attn_mask;
    ATTN2ONNX_RETURN_IF_ERROR(tensor(0, q));
    ATTN2ONNX_RETURN_IF_ERROR(tensor(1, k));
    ATTN2ONNX_RETURN_IF_ERROR(tensor(2, v));
    ATTN2ONNX_RETURN_IF_ERROR(tensor(3, q_factors));
    ATTN2ONNX_RETURN_IF_ERROR(tensor(4, k_factors));
    ATTN2ONNX_RETURN_IF_ERROR(mask(kKeyPaddingMask, key_padding_mask));
    ATTN2ONNX_RETURN_IF_ERROR(tensor(6, static_mix));
    ATTN2ONNX_RETURN_IF_ERROR(mask(kAttnMask, attn_mask));
    return run(ctx, q, k, v, q_factors, k_factors, key_padding_mask, static_mix, attn_mask);
  }

  Ort::Status run(Ort::KernelContext& ctx, const Input<E>& q, const Input<E>& k, const Input<E>& v,
                  const Input<E>& q_factors, const Input<E>& k_factors, const Input<uint8_t>& key_padding_mask,
                  const Input<E>& static_mix, const Input<uint8_t>& attn_mask) const {
    const auto& qs = q.shape;
    const auto& ks = k.shape;
    const auto& qfs = q_factors.shape;
    const auto& kfs = k_factors.shape;
    const auto& ms = key_padding_mask.shape;
    const auto& ws = static_mix.shape;
    auto fail = [](const std::string& what) { return invalid(kOp, what); };
    if (qs.size() != 4) return fail("q must be [B,T,N,d], got " + shape_str(qs));
    const int64_t B = qs[0], T = qs[1], N = qs[2], d = qs[3];
    if (ks.size() != 4 || ks[0] != B || ks[2] != N || ks[3] != d)
      return fail("k must be [B,S,N,d] matching q " + shape_str(qs) + ", got " + shape_str(ks));
    const int64_t S = ks[1];
    const auto& vs = v.shape;
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
    if (T > kMaxLength || S > kMaxLength) return fail("T and S must be at most " + std::to_string(kMaxLength));
    MaskView mask_view;
    if (attn_mask.present && !mask_view.read(attn_mask.shape, {B, N, T, S}))
      return fail("attn_mask must be [T,S] or [B,N,T,S] = " + shape_str({B, N, T, S}) + " (any axis may be 1), got " +
                  shape_str(attn_mask.shape));
    int64_t out_elements = 0;
    if (!element_count({B, T, N, dv}, out_elements)) return fail("output [B,T,N,dv] has too many elements");

    Ort::UnownedValue o = ctx.GetOutput(0, {B, T, N, dv});
    if (o == nullptr) return fail("output o has no value: the node names it \"\"");
    E* out = o.GetTensorMutableData<E>();
    const size_t out_count = static_cast<size_t>(out_elements);
    if (out_count == 0) return ok();
    if (S == 0) {
      std::fill(out, out + out_count, from_float<E>(0.f));
      return ok();
    }

    Problem p;
    p.B = B, p.T = T, p.S = S, p.N = N, p.d = d, p.dv = dv, p.R = R;
    p.scale = scale_ != 0.f ? scale_ : static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
    p.causal = causal_ != 0, p.use_static = use_static_ != 0;
    p.window = std::min(window_, S);  // any window >= S keeps every key up to the query: no overflow in pos - window
    p.Sp = round_up(S, kCB), p.dvb = (dv + kCB - 1) / kCB;

    // fp32 views of the inputs (converted copies for fp16 / bf16).
    std::vector<float> q32, qf32, wb32, out32;
    p.q = float_view(q.data, static_cast<size_t>(B * T * N * d), q32);
    p.qf = float_view(q_factors.data, static_cast<size_t>(B * T * 2 * F * N), qf32);
    p.wb = float_view(static_mix.data, static_cast<size_t>(2 * N * N), wb32);
    if constexpr (std::is_same_v<E, float>) {
      p.out = out;
    } else {
      out32.resize(out_count);
      p.out = out32.data();
    }
    std::vector<int32_t> pad;
    std::vector<int64_t> count;
    key_padding(key_padding_mask.data, B, S, p.Sp, pad, count);
    p.pad = pad.data(), p.count = count.data();
    std::vector<int64_t> mfirst, mlast;
    std::vector<uint8_t> mblind;
    if (attn_mask.present) {
      p.am = attn_mask.data;
      p.am_b = mask_view.stride[0], p.am_n = mask_view.stride[1], p.am_t = mask_view.stride[2], p.am_s = mask_view.stride[3];
      mask_rows(p, mask_view.heads, mfirst, mlast, mblind);
    }

    const Fns fns = kernel_fns(R);
    if (T <= kDirectMaxT) {
      run_direct(ctx, p, fns, k.data, v.data, k_factors.data);
    } else {
      run_blocked(ctx, p, fns, k.data, v.data, k_factors.data);
    }
    if (p.failed) return Ort::Status("DcmhaAttention: out of memory for the score panel", ORT_FAIL);

    if constexpr (!std::is_same_v<E, float>) {
      for (size_t i = 0; i < out_count; ++i) out[i] = from_float<E>(p.out[i]);
    }
    return ok();
  }

  // Blocked path: K, V and key factors packed, then (batch, query block) work items.
  void run_blocked(Ort::KernelContext& ctx, Problem& p, const Fns& fns, const E* k, const E* v, const E* kf) const {
    const int64_t B = p.B, N = p.N, F = 2 * p.R + 1;
    const BlockPlan plan = plan_blocks(p.S, N, budget_);
    p.tq = plan.rows, p.tiled = plan.tiled, p.nqb = (p.T + p.tq - 1) / p.tq;
    std::vector<float> kt(static_cast<size_t>(B * N * p.d * p.Sp)), vp(static_cast<size_t>(B * N * p.dvb * p.Sp * kCB)),
        kfp(static_cast<size_t>(B * 2 * F * N * p.Sp));
    p.kt = kt.data(), p.vp = vp.data(), p.kf = kfp.data();
    PackJob<E> pack{&p, k, v, kf, kt.data(), vp.data(), kfp.data()};
    ctx.ParallelFor(pack_item<E>, static_cast<size_t>(B * N), 0, &pack);
    Job job{&p, fns.block};
    ctx.ParallelFor(run_item, static_cast<size_t>(B * p.nqb), 0, &job);
  }

  // Direct path (T <= kDirectMaxT): inputs read in place; (batch, key split) work items in two
  // phases around the merge of the row statistics; the splits' partial outputs summed in order.
  void run_direct(Ort::KernelContext& ctx, Problem& p, const Fns& fns, const E* k, const E* v, const E* kf) const {
    const int64_t B = p.B, T = p.T, S = p.S, N = p.N, dv = p.dv;
    std::vector<float> k32, v32, kf32;
    p.kd = float_view(k, static_cast<size_t>(B * S * N * p.d), k32);
    p.vd = float_view(v, static_cast<size_t>(B * S * N * dv), v32);
    p.kfd = float_view(kf, static_cast<size_t>(B * S * 2 * (2 * p.R + 1) * N), kf32);
    p.Sld = p.Sp + kVL;  // consecutive heads' rows never a multiple of 4 KiB apart
    p.nch = (p.Sp + kChunk - 1) / kChunk;
    p.nsplit = (p.Sp + kSplitKeys - 1) / kSplitKeys;
    const size_t rows = static_cast<size_t>(B * T * N);
    std::unique_ptr<float[]> scores(new float[rows * p.Sld]), stats(new float[rows * (2 * p.nch + 2)]);
    std::vector<float> part(static_cast<size_t>(p.nsplit) * rows * dv, 0.f);
    p.scores = scores.get(), p.cmax = stats.get(), p.csum = p.cmax + rows * p.nch;
    p.rowm = p.csum + rows * p.nch, p.rowinv = p.rowm + rows, p.part = part.data();
    const size_t items = static_cast<size_t>(B * p.nsplit);
    Job scores_job{&p, fns.scores};
    ctx.ParallelFor(run_item, items, 0, &scores_job);
    if (p.failed) return;
    direct_merge(p);
    Job apply_job{&p, fns.apply};
    ctx.ParallelFor(run_item, items, 0, &apply_job);
    const size_t per_batch = rows / static_cast<size_t>(B) * static_cast<size_t>(dv);
    for (int64_t b = 0; b < B; ++b) {
      float* o = p.out + b * per_batch;
      std::fill(o, o + per_batch, 0.f);
      for (int64_t j = 0; j < p.nsplit; ++j) {
        const float* src = p.part + (b * p.nsplit + j) * per_batch;
        for (size_t x = 0; x < per_batch; ++x) o[x] += src[x];
      }
    }
  }
};

// Output [B,T,N] of q and dv of v (symbolic dims kept), of q's element type: ORT infers every
// DcmhaAttention node with the function of the op registered first, whatever its type.
OrtStatusPtr infer_output(const OrtCustomOp*, OrtShapeInferContext* context) noexcept {
  return status_of(kOp, [context] {
    const OrtApi& api = Ort::GetApi();
    auto input = [&](size_t index) {  // owned by the context
      OrtTensorTypeAndShapeInfo* info = nullptr;
      Ort::ThrowOnError(api.ShapeInferContext_GetInputTypeShape(context, index, &info));
      return Ort::ConstTensorTypeAndShapeInfo{info};
    };
    auto symbols = [](const Ort::ConstTensorTypeAndShapeInfo& info) {
      std::vector<const char*> names(info.GetDimensionsCount(), nullptr);
      if (!names.empty()) info.GetSymbolicDimensions(names.data(), names.size());
      return names;
    };
    const Ort::ConstTensorTypeAndShapeInfo q = input(0), v = input(2);
    std::vector<int64_t> dims = q.GetShape();
    std::vector<const char*> names = symbols(q);
    if (dims.size() == 4 && v.GetDimensionsCount() == 4) {
      dims[3] = v.GetShape()[3];
      names[3] = symbols(v)[3];
    }
    OrtTensorTypeAndShapeInfo* raw = nullptr;
    Ort::ThrowOnError(api.CreateTensorTypeAndShapeInfo(&raw));
    const Ort::TensorTypeAndShapeInfo owner{raw};  // released on return
    Ort::ThrowOnError(api.SetTensorElementType(raw, q.GetElementType()));
    Ort::ThrowOnError(api.SetDimensions(raw, dims.data(), dims.size()));
    Ort::ThrowOnError(api.SetSymbolicDimensions(raw, names.data(), names.size()));
    return Ort::Status(api.ShapeInferContext_SetOutputTypeShape(context, 0, raw));
  });
}

// ORT's view of the op for element type E: seven required inputs and the optional attn_mask
// (declared so, ORT refuses a node that names a required one "" when it loads the model), one
// output, status-returning kernel creation and compute.
template <typename E>
struct DcmhaAttentionOp : Ort::CustomOpBase<DcmhaAttentionOp<E>, DcmhaAttentionKernel<E>, true> {
  DcmhaAttentionOp() { OrtCustomOp::InferOutputShapeFn = infer_output; }
  const char* GetName() const { return kOp; }
  const char* GetExecutionProviderType() const { return kCpuEP; }
  size_t GetInputTypeCount() const { return kInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == kKeyPaddingMask || index == kAttnMask ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL : onnx_type<E>();
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == kAttnMask ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return onnx_type<E>(); }
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const noexcept {
    return status_of(kOp, [&] {
      auto created = std::make_unique<DcmhaAttentionKernel<E>>();
      ATTN2ONNX_RETURN_IF_ERROR(created->read_attributes(&api, info));
      *kernel = created.release();
      return ok();
    });
  }
};

void make_ops(std::vector<OrtCustomOp*>& ops) {
  ops.push_back(new DcmhaAttentionOp<float>());
  ops.push_back(new DcmhaAttentionOp<Ort::Float16_t>());
  ops.push_back(new DcmhaAttentionOp<Ort::BFloat16_t>());
}
ATTN2ONNX_REGISTER_OPS(make_ops);

}  // namespace
}  // namespace attn2onnx

// The work plan a call gets, for tests and benchmarks (ctypes): T query rows, S keys, N heads,
// rank R, `budget` bytes of per-thread scratch (0: ATTN2ONNX_DCMHA_SCRATCH_BYTES or the default).
// out = {direct path, query rows per work item, tiled panel, per-thread scratch bytes at most}.
extern "C" __attribute__((visibility("default"))) void attn2onnx_dcmha_plan(int64_t T, int64_t S, int64_t N, int64_t R,
                                                                           int64_t budget, int64_t* out) {
  using namespace attn2onnx;
  if (T <= kDirectMaxT) {
    out[0] = 1, out[1] = T, out[2] = 0;
    out[3] = static_cast<int64_t>(sizeof(float) * direct_scratch_floats(T, N, 2 * R + 1));
    return;
  }
  const BlockPlan plan = plan_blocks(S, N, budget > 0 ? static_cast<size_t>(budget) : scratch_budget());
  out[0] = 0, out[1] = plan.rows, out[2] = plan.tiled, out[3] = static_cast<int64_t>(plan.bytes);
}
