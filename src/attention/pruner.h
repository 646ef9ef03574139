// Twilight level 2 on the CPU (TWILIGHT.md section 1, steps 3-4): estimate the attention weights of
// a selector's candidates with the INT4 key mirror, then keep the exact top-p set of them.
//
// Per list of the input Selection:
//   z_i = q . K~_i / sqrt(d) for every candidate i (K~ = zero + code * scale, the INT4 mirror),
//   w   = softmax(z) over the candidates (fp32),
//   I   = topp_select(w, p) (topp.h: the exact threshold, ties kept), then floor / cap, plus the
//         current token n_ctx - 1 (always kept, also when the selector did not propose it).
// Group mode (one list per kv head, the default): the G query heads' normalised weights are averaged
// (sum / G, still a distribution) and one list is kept for the kv head. Head mode: one list per
// query head, each with its own softmax.
// Estimated weights below ~1e-38 of a list's maximum (score gap > 87) are 0 and so dropped even at
// p = 1 (topp.h keeps only positive weights); they carry no fp32 mass.
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

struct PruneOptions {
  float p = 0.95f;          // top-p mass, in (0, 1]
  int64_t min_tokens = 0;   // floor: lists shorter than this get the heaviest candidates added (0 = none)
  int64_t max_tokens = 0;   // cap: at most this many tokens per list, current token included (0 = none)
};

// Per output list.
struct PruneStats {
  int64_t n_in = 0;           // candidates
  int64_t n_out = 0;          // kept tokens (current token included)
  float est_mass_kept = 0.f;  // sum of the estimated (group-averaged in Group mode) weights kept
};

// q: [n_heads][d] post-RoPE query. in: candidates (mode and n_lists must match hs); positions in
// [0, n_ctx), ascending, unique. out: same mode and n_lists, positions ascending. stats: n_lists.
void prune_topp(const Int4Keys& keys, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                const Selection& in, int64_t n_ctx, const PruneOptions& opt, Selection& out,
                std::vector<PruneStats>& stats, ThreadPool& tp);

// The same on the engine's key side structures (key_side.h).
void prune_topp(const KeySide& ks, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                const Selection& in, int64_t n_ctx, const PruneOptions& opt, Selection& out,
                std::vector<PruneStats>& stats, ThreadPool& tp);

// The estimate alone: z[r][j] = q_r . K~_{tokens[j]} / sqrt(d) for nq query heads sharing kv head
// `kvh`. q: [nq][d]; z: [nq][m]. Fast (unpack once, score all nq) and scalar reference versions.
void estimate_scores(const Int4Keys& keys, const kv::SeqPages& seq, int layer, int kvh, int d, const float* q, int nq,
                     const int32_t* tokens, int64_t m, float* z);
void estimate_scores_reference(const Int4Keys& keys, const kv::SeqPages& seq, int layer, int kvh, int d,
                               const float* q, int nq, const int32_t* tokens, int64_t m, float* z);

}  // namespace tw::attn
