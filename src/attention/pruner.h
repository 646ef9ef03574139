// Twilight level 2 on the CPU (TWILIGHT.md section 1, steps 3-4): estimate the attention weights of
// a selector's candidates with the INT4 key mirror, then keep the exact top-p set of them.
//
// Per list of the input Selection:
//   z_i = the INT4 estimate of q . K_i / sqrt(d) for every candidate i (below),
//   w   = softmax(z) over the candidates (fp32),
//   I   = topp_select(w, p) (topp.h: the exact threshold, ties kept), then floor / cap, plus the
//         current token n_ctx - 1 (always kept, also when the selector did not propose it).
// Group mode (one list per kv head, the default): the G query heads' normalised weights are averaged
// (sum / G, still a distribution) and one list is kept for the kv head. Head mode: one list per
// query head, each with its own softmax.
// Group mode combines the G heads in one of two ways (PruneOptions::combine):
//   Mean  (default): the G query heads' normalised weights are averaged (sum / G, still a
//         distribution) and one top-p set is kept for the kv head. A diffuse head can keep much
//         less than p of its own mass while peaked heads keep more.
//   Union: each head's own top-p set, united: every head keeps >= p of ITS estimated mass.
// Head mode: one list per query head, each with its own softmax.
// Estimated weights below ~1e-38 of a list's maximum (score gap > 87) are 0 and so dropped even at
// p = 1 (topp.h keeps only positive weights); they carry no fp32 mass.
//
// Guardrail (TWILIGHT.md 4.5): the estimate is normalised over the candidates I0 only, so attention
// mass outside I0 is invisible to it. With Quest page bounds u_p (an upper bound of q.k over page p,
// scaled by 1/sqrt(d)) and n_p = the page's tokens that are not candidates, per query head
//   U = sum_p n_p exp(u_p - M),  S = sum_{i in I0} exp(z_i - M),  bound = U / (S + U)
// is an upper bound of the true weight outside I0 when z is exact (with INT4 z it is an estimate).
// When the bound exceeds guard_frac * (1 - p) for a head of a list, the guard acts on that list:
//   Widen: add the non-candidate pages with the largest u_p, per head, until every head's bound (with
//          the S it had before widening, so conservatively) is back under the target; if that would
//          make I0 larger than widen_max * n_ctx, take the whole context as I0 instead (then prune).
//   All:   take the whole context as I0, then prune as usual.
//   Dense: keep the whole context (no pruning) for that list.
// Report only measures the bound. The bound reported is the one of the final I0 (0 when I0 covers
// the context).
// INT4 estimate (integer form, so the CPU can use AVX-512 VNNI): per query head, qs = q / sqrt(d) is
// quantised once per call to int8, symmetric: sq = max|qs| / 127, q8 = round(qs / sq) (to nearest
// even), with the per-head constants qsum = sum qs and cq = 7.5 * sum_i (qs_i - sq * q8_i). Then
//   z = scale_t * (sq * dot + cq) + zero_t * qsum,   dot = sum_i code_ti * q8_i (exact in int32),
// which is q . K~_t / sqrt(d) (K~ = zero + code * scale, the INT4 mirror) up to
// scale_t * sum_i (code_ti - 7.5) * (qs_i - sq * q8_i): centring the codes at 7.5 halves the query
// rounding's worst case, |error| <= 7.5 * scale_t * sum_i |qs_i - sq * q8_i| <= 3.75 * d * sq * scale_t.
// The score is then rounded to fp16 (nearest even; at most 65504; from -65520 down it is -inf, weight 0),
// relative error <= 2^-11:
// far below the INT4 keys' own error, and it halves the GPU pruner's on-chip scores (CUDA.md: two
// blocks of a B0 = 8192 list per SM at G 4, so 264 lists run in one wave).
// Every SIMD level computes exactly this (bit-identical to estimate_scores_reference).
// GQA-aware estimate: each INT4 row is loaded and unpacked once per kv head and scored against all G
// query heads (TWILIGHT.md section 4.2). Threads split the lists; results do not depend on the
// thread count.
#pragma once
#include <cstdint>
#include <vector>

#include "attention/dense_cpu.h"
#include "attention/key_side.h"
#include "attention/sparse_types.h"
#include "common/threadpool.h"
#include "kv/kv_cache.h"

namespace tw::attn {

// Read access to an INT4 key mirror, per (layer, physical page, kv head):
//   codes: [kPageSize][d/2] bytes, element 2i in the low nibble, 2i+1 in the high nibble;
//   scale, zero: [kPageSize] floats; K~ = zero + code * scale.
// A plain view (context pointer + three functions) so the pruner builds without knowing who owns
// the mirror; make one from any class with k4 / k4_scale / k4_zero accessors with int4_keys().
struct Int4Keys {
  const void* ctx = nullptr;
  const uint8_t* (*codes)(const void* ctx, int layer, int32_t phys, int h) = nullptr;
  const float* (*scale)(const void* ctx, int layer, int32_t phys, int h) = nullptr;
  const float* (*zero)(const void* ctx, int layer, int32_t phys, int h) = nullptr;
};

// View of a mirror class M with
//   const uint8_t* k4(int layer, int32_t phys, int h) const;
//   const float* k4_scale(int layer, int32_t phys, int h) const;
//   const float* k4_zero(int layer, int32_t phys, int h) const;
// (e.g. attn::KeySide). The view holds &m: m must outlive it.
template <class M>
Int4Keys int4_keys(const M& m) {
  Int4Keys v;
  v.ctx = &m;
  v.codes = [](const void* c, int l, int32_t p, int h) { return static_cast<const M*>(c)->k4(l, p, h); };
  v.scale = [](const void* c, int l, int32_t p, int h) { return static_cast<const M*>(c)->k4_scale(l, p, h); };
  v.zero = [](const void* c, int l, int32_t p, int h) { return static_cast<const M*>(c)->k4_zero(l, p, h); };
  return v;
}

enum class GroupCombine { Mean, Union };
enum class Guard { Off, Report, Widen, All, Dense };
const char* guard_name(Guard g);
const char* combine_name(GroupCombine c);

struct PruneOptions {
  float p = 0.95f;          // top-p mass, in (0, 1]
  int64_t min_tokens = 0;   // floor: lists shorter than this get the heaviest candidates added (0 = none)
  int64_t max_tokens = 0;   // cap: at most this many tokens per list, current token included (0 = none)
  GroupCombine combine = GroupCombine::Mean;  // Group mode only
  Guard guard = Guard::Off;                   // needs PageBounds unless Off
  float guard_frac = 1.f;   // the guard acts when a head's bound > guard_frac * (1 - p); in [0, 1]
  float widen_max = 0.5f;   // Widen: beyond this fraction of n_ctx take the whole context; in (0, 1]
  // Estimate-error margin (0 = off): also keep candidates whose weight could reach the top-p threshold
  // if their score were margin * e higher, e = scale_t * (sum_d |qs_d| / 2 + 7.5 * sum_d |qs_d - sq * q8_d|)
  // (qs = q / sqrt(d)) the bound of that token's estimate error (INT4 keys + int8 query; 1 = the full
  // bound). Helps where the mirror is coarse (large scales).
  float margin = 0.f;
};

// Per output list.
struct PruneStats {
  int64_t n_in = 0;           // candidates (the selector's I0)
  int64_t n_out = 0;          // kept tokens (current token included)
  float est_mass_kept = 0.f;  // estimated weights kept, averaged over the list's heads (over the final I0)
  float est_mass_min = 0.f;   // the same, the list's least-served head
  float outside_bound = 0.f;  // guard: max over the list's heads of U / (S + U) for the final I0
  float outside_bound0 = 0.f; // guard: the same for the selector's I0 (before the guard acted)
  int64_t n_added = 0;        // guard: candidates added to I0
  int action = 0;             // guard: 0 none, 1 widened, 2 whole context as I0, 3 dense (no pruning)
};

// Quest page bounds for the guard: u[h * n_pages + lp] >= q_h.k for every token of logical page lp, query
// head h (NOT scaled by 1/sqrt(d)), n_pages = ceil(n_ctx / 16); as written by quest_page_upper_bounds.
struct PageBounds {
  const float* u = nullptr;  // [n_heads][n_pages]
  int64_t n_pages = 0;
};

// q: [n_heads][d] post-RoPE query. in: candidates (mode and n_lists must match hs); positions in
// [0, n_ctx), ascending, unique. out: same mode and n_lists, positions ascending. stats: n_lists.
void prune_topp(const Int4Keys& keys, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                const Selection& in, int64_t n_ctx, const PruneOptions& opt, Selection& out,
                std::vector<PruneStats>& stats, ThreadPool& tp);

// With the guard (opt.guard != Off needs bounds.u).
void prune_topp(const Int4Keys& keys, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                const Selection& in, int64_t n_ctx, const PruneOptions& opt, const PageBounds& bounds,
                Selection& out, std::vector<PruneStats>& stats, ThreadPool& tp);

// The same on the engine's key side structures (key_side.h).
void prune_topp(const KeySide& ks, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                const Selection& in, int64_t n_ctx, const PruneOptions& opt, const PageBounds& bounds,
                Selection& out, std::vector<PruneStats>& stats, ThreadPool& tp);
void prune_topp(const KeySide& ks, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                const Selection& in, int64_t n_ctx, const PruneOptions& opt, Selection& out,
                std::vector<PruneStats>& stats, ThreadPool& tp);

// The estimate alone (the INT4 estimate above): z[r][j] for nq query heads sharing kv head `kvh` and
// the tokens tokens[j]. q: [nq][d]; z: [nq][m]. Fast (unpack once, score all nq) and scalar reference
// versions, bit-identical.
void estimate_scores(const Int4Keys& keys, const kv::SeqPages& seq, int layer, int kvh, int d, const float* q, int nq,
                     const int32_t* tokens, int64_t m, float* z);
// The estimate's query quantisation (above) of one head: q [d] -> q8 [d], sq, cq, qsum.
void quantize_query_int8(const float* q, int d, int8_t* q8, float& sq, float& cq, float& qsum);
// One score of the estimate from its exact integer dot (the definition above, fp16 rounding included).
float estimate_score(int64_t dot, float scale, float zero, float sq, float cq, float qsum);
void estimate_scores_reference(const Int4Keys& keys, const kv::SeqPages& seq, int layer, int kvh, int d,
                               const float* q, int nq, const int32_t* tokens, int64_t m, float* z);

// The guard's bound for one query head: z [m] scores (already scaled) of the candidates tokens [m]
// (ascending), u [n_pages] the head's raw page bounds, scale = 1/sqrt(d). Returns U / (S + U) over the
// non-candidate tokens < n_ctx (0 when there are none). Computed in double, max-shifted (no overflow).
double outside_bound(const float* z, const int32_t* tokens, int64_t m, const float* u, int64_t n_ctx, float scale);

}  // namespace tw::attn
