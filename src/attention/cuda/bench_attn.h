// GPU attention benchmark (issue 4): one decode step of one layer for a batch of sequences, timed
// per stage on the device, for dense attention (ours), fixed-budget Quest (select + attend over I0)
// and Twilight (Quest select + fused top-p pruner + sparse attention over I1).
//
// Honest measurement (TWILIGHT.md 4.6):
//  - every sequence has its own pages, and every timed call reads a different "layer" (a distinct
//    set of K/V pools and side structures), rotated over enough sets that their total is several
//    times the 60 MB L2: one shared buffer would time the cache, not HBM;
//  - the KV is filled through the real append path (kv_append: K/V + Quest bounds + INT4 mirror);
//  - stage times are medians over blocks of calls timed with CUDA events; the Twilight step is also
//    timed as one CUDA-graph replay;
//  - bytes read per stage follow TWILIGHT.md section 2 with this layout's real sizes, and GB/s is
//    compared with a device-to-device copy measured in the same run (bytes read + written).
//
// Inputs whose attention concentration is controlled (synthetic) or comes from a real model (a KV
// dump of the CPU engine: kv/kv_dump.h, replayed and tiled to the target length).
#pragma once
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "attention/cuda/layout.h"

namespace tw::attn::cuda {

struct GpuAttnBenchOptions {
  std::vector<int> batch = {1, 16, 64};
  std::vector<int64_t> ctx = {8192, 32768, 131072};
  int n_heads = 32, n_kv_heads = 8, head_dim = 128;  // Llama-3.1-8B attention
  KvDtype dtype = KvDtype::F16;
  std::vector<float> p = {0.85f, 0.95f};
  std::vector<int64_t> b0 = {8192, 0};  // 0 = L / 4
  // Synthetic inputs: logits q.k/sqrt(d) ~ N(0, logit_std^2) plus a fraction of heavy tokens whose
  // keys lean toward the group's query direction by heavy_boost logits. Ignored with a real dump.
  float logit_std = 1.0f;
  float heavy_frac = 0.002f;
  float heavy_boost = 6.0f;
  std::string input_name = "synthetic";
  // Real-model input: a KV dump of the CPU engine (kv/kv_dump.h, `twilight bench --attn-dump`). The
  // shape (H, Hkv, d) becomes the dump's; set i replays dumped layer i % n_layers with the real
  // post-RoPE query of its first stored step for every sequence; contexts longer than the dump
  // are tiled (kv::tiled_source: the first `dump_keep` tokens once, the rest repeated).
  std::string kv_dump;
  int64_t dump_keep = 16;
  double min_rotation_bytes = 1.0e9;  // rotate KV sets until their total reaches this
  double max_mem_bytes = 110.0e9;     // sizes that do not fit are reported as skipped
  int reps = 10, trials = 7;
  uint64_t seed = 1;
};

// Runs every (batch, ctx) x (p, B0) point; prints a markdown table to `table` and one JSON object
// per row to `json`. Throws tw::Error for unsupported shapes (head dim, group size, dtype).
void run_gpu_attention_bench(const GpuAttnBenchOptions& opt, std::ostream& table, std::ostream& json);

}  // namespace tw::attn::cuda
