// The Twilight decode step on the GPU (Quest select of whole pages -> fused top-p pruner -> varlen sparse
// attention)
// captured into a CUDA graph: the capture runs in global mode, where any synchronising call is an
// error, so a successful capture shows the step needs no host synchronisation (every size lives on
// the device). The replay must reproduce the un-captured run exactly, also after the inputs (query,
// sequence lengths) change in place: the graph is not re-captured, the sizes follow the data.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "attention/cuda/pruner.h"
#include "attention/cuda/pruner_test_util.h"
#include "attention/cuda/quest.h"
#include "attention/cuda/real_kv_test_util.h"
#include "attention/cuda/sparse_decode.h"
#include "attention/sparse_cpu.h"

namespace tw::attn::cuda {
namespace {

using namespace ptest;
using ::tw::cuda::DeviceBuffer;
using ::tw::cuda::test::fresh_seed;

struct Step {
  const Batch& B;
  int64_t budget, max_len;
  PruneParams prm;
  int cap0 = 0;
  DevLists i0, i1;
  DeviceBuffer mass, sws, out;
  size_t sws_bytes = 0;

  Step(const Batch& b, int64_t budget_, int64_t max_len_, float p)
      : B(b),
        budget(budget_),
        max_len(max_len_),
        cap0((int)quest_list_capacity(b.kv, budget_)),
        i0(b.batch * b.spec.n_kv_heads, cap0),
        i1(b.batch * b.spec.n_kv_heads, cap0 + 1),
        mass((size_t)b.batch * b.spec.n_kv_heads * 4),
        out(b.q.size() * 4) {
    prm.p = p;
    sws_bytes = sparse_decode_workspace_bytes(B.kv, i1.tl.capacity);
    sws = DeviceBuffer(sws_bytes);
  }
  // The step as the benchmark runs it: I0 as whole pages (the token form of I0 is PrunerCuda's input).
  void run(cudaStream_t s) {
    const PageLists pages{i0.tl.count, i0.tl.tokens, cap0 / kPageSize};
    quest_select_pages(B.kv, B.ks, B.d_q.as<float>(), budget, max_len, pages, s);
    prune_topp(B.kv, B.ks, B.d_q.as<float>(), pages, prm, i1.tl, mass.as<float>(), s);
    sparse_decode(B.kv, B.d_q.as<float>(), i1.tl, out.as<float>(), sws.get(), sws_bytes, s);
  }
  struct Result {
    HostLists lists;
    std::vector<float> out, mass;
  };
  // The step run directly / as the graph `exec`, into poisoned outputs, read back.
  Result direct(cudaStream_t s) {
    poison();
    run(s);
    TW_CUDA_CHECK(cudaStreamSynchronize(s));
    return read();
  }
  Result replay(cudaGraphExec_t exec, cudaStream_t s) {
    poison();
    TW_CUDA_CHECK(cudaGraphLaunch(exec, s));
    TW_CUDA_CHECK(cudaStreamSynchronize(s));
    return read();
  }
  void poison() {
    i0.poison();
    i1.poison();
    TW_CUDA_CHECK(cudaMemset(out.get(), 0xFF, out.size()));
    TW_CUDA_CHECK(cudaMemset(mass.get(), 0xFF, mass.size()));
  }
  Result read() const {
    Result r;
    const int n_lists = B.batch * B.spec.n_kv_heads;
    r.lists = i1.download(n_lists);
    r.out.resize(B.q.size());
    out.download(r.out.data(), r.out.size() * 4);
    r.mass.resize(n_lists);
    mass.download(r.mass.data(), r.mass.size() * 4);
    return r;
  }
};

void expect_same(const Step::Result& a, const Step::Result& b) {
  ASSERT_EQ(a.lists.lists.size(), b.lists.lists.size());
  for (size_t i = 0; i < a.lists.lists.size(); ++i) EXPECT_EQ(a.lists.lists[i], b.lists.lists[i]) << "list " << i;
  int diff = 0;
  for (size_t i = 0; i < a.out.size(); ++i) diff += !(a.out[i] == b.out[i]);
  EXPECT_EQ(diff, 0) << "outputs differ between the captured and the direct run";
  for (size_t i = 0; i < a.mass.size(); ++i) EXPECT_EQ(a.mass[i], b.mass[i]) << "mass " << i;
}

// The step captured in global mode (any synchronising call invalidates the capture) and instantiated.
cudaGraphExec_t capture(Step& step, cudaStream_t s) {
  cudaGraph_t graph;
  TW_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  step.run(s);
  cudaStreamCaptureStatus st;
  TW_CUDA_CHECK(cudaStreamIsCapturing(s, &st));
  EXPECT_EQ(st, cudaStreamCaptureStatusActive) << "capture was invalidated (a synchronising call?)";
  TW_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  cudaGraphExec_t exec;
  TW_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  TW_CUDA_CHECK(cudaGraphDestroy(graph));
  return exec;
}

// The chain's output is exact attention over the lists it produced (CPU sparse_reference), each list
// ending with the current token. Per head row, relative: the sparse kernel rounds the softmax weights to
// the KV dtype for the tensor-core P.V (sparse_decode_test.cu states the bound).
void check_output(const Batch& B, const Step::Result& r, const std::vector<int32_t>& len) {
  const int H = B.spec.n_heads, Hkv = B.spec.n_kv_heads, d = B.spec.head_dim;
  std::vector<float> ref(r.out.size());
  for (int b = 0; b < B.batch; ++b) {
    kv::SeqPages seq = B.seqs[b];
    seq.n_tokens = len[b];
    const Selection sel = selection_of(r.lists, b, Hkv);
    for (int h = 0; h < Hkv; ++h) EXPECT_EQ(sel.list(h)[sel.size(h) - 1], len[b] - 1);
    const size_t off = (size_t)b * H * d;
    sparse_reference(*B.pool, seq, 0, B.hs(), B.q.data() + off, sel, len[b], ref.data() + off);
  }
  const double tol = B.kv.dtype == KvDtype::F16 ? 2e-3 : 1.5e-2;
  int bad = 0;
  for (size_t row = 0; row < ref.size() / d; ++row) {
    double e2 = 0, r2 = 0;
    for (int i = 0; i < d; ++i) {
      const double o = r.out[row * d + i], x = ref[row * d + i];
      e2 += (o - x) * (o - x);
      r2 += x * x;
    }
    if (!(std::sqrt(e2) <= tol * std::sqrt(r2) + 1e-6) && ++bad <= 5)
      ADD_FAILURE() << "head row " << row << ": relative error " << std::sqrt(e2 / std::max(r2, 1e-30));
  }
  EXPECT_EQ(bad, 0);
}

TEST(StepCuda, GraphReplayMatchesDirectRun) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  for (auto [H, Hkv, d, dt] : {std::tuple{32, 8, 128, KvDtype::F16}, std::tuple{14, 2, 64, KvDtype::BF16}}) {
    SCOPED_TRACE(cat("H ", H, " Hkv ", Hkv, " d ", d));
    BatchSpec spec;
    spec.n_heads = H, spec.n_kv_heads = Hkv, spec.head_dim = d, spec.dtype = dt;
    spec.seq_len = {3000, 900, 6100, 17, 4500};
    spec.kscale = 2.f;
    auto B = make_batch(spec, rng);
    Step step(*B, 1024, 6100, 0.9f);
    cudaStream_t s;
    TW_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

    const Step::Result direct = step.direct(s);
    const cudaGraphExec_t exec = capture(step, s);
    expect_same(step.replay(exec, s), direct);

    // New query and shorter sequences written in place; the same graph follows them.
    B->q = ::tw::cuda::test::random_normal(rng, B->q.size());
    B->d_q.upload(B->q.data(), B->q.size() * 4);
    std::vector<int32_t> len = {2990, 900, 5000, 9, 4497};
    B->d_len.upload(len.data(), len.size() * 4);
    const Step::Result replay = step.replay(exec, s);
    expect_same(replay, step.direct(s));
    check_output(*B, replay, len);

    TW_CUDA_CHECK(cudaGraphExecDestroy(exec));
    TW_CUDA_CHECK(cudaStreamDestroy(s));
  }
}

// The real model's attention (TW_REAL_KV, real_kv_test_util.h) through the captured step at B0 8192 and
// B0 = a quarter of the longest sequence: the replay equals the direct run, the output is exact
// attention over the step's own lists, and the lists are the CPU chain's (select_quest, then
// prune_topp) token for token wherever that chain's top-p boundary is clear; a list may differ only where
// fp32 sums in another order can flip a token at the threshold (PrunerCuda checks those lists against
// the top-p definition).
TEST(StepCuda, RealModelDump) {
  TW_REQUIRE_CUDA_DEVICE();
  TW_REQUIRE_REAL_KV();
  const kv::KVDump& dump = *real::dump();
  SCOPED_TRACE(cat("real KV: ", dump.info.model_name, ", ", dump.info.n_tokens, " tokens"));
  ThreadPool tp(2);
  int same = 0, lists = 0;
  for (KvDtype dt : {KvDtype::F16, KvDtype::BF16}) {
    auto B = real::standard_batch(dump, dt);
    const std::vector<int32_t> len(B->spec.seq_len.begin(), B->spec.seq_len.end());
    const int64_t max_len = *std::max_element(len.begin(), len.end());
    for (int64_t b0 : {int64_t(8192), max_len / 4})
      for (float p : {0.85f, 0.95f}) {
        SCOPED_TRACE(cat(dt == KvDtype::F16 ? "f16" : "bf16", " B0 ", b0, " p ", p));
        Step step(*B, b0, max_len, p);
        cudaStream_t s;
        TW_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
        const Step::Result direct = step.direct(s);
        const cudaGraphExec_t exec = capture(step, s);
        const Step::Result replay = step.replay(exec, s);
        expect_same(replay, direct);
        check_output(*B, replay, len);
        for (int b = 0; b < B->batch; ++b) {
          Selection cand, kept;
          real::cpu_chain(*B, b, b0, p, tp, cand, kept);
          for (int h = 0; h < B->spec.n_kv_heads; ++h) {
            const std::vector<int32_t> want(kept.list(h), kept.list(h) + kept.size(h));
            same += replay.lists.lists[(size_t)b * B->spec.n_kv_heads + h] == want;
            ++lists;
          }
        }
        TW_CUDA_CHECK(cudaGraphExecDestroy(exec));
        TW_CUDA_CHECK(cudaStreamDestroy(s));
      }
  }
  std::printf("real-model step: %d of %d lists equal the CPU chain's\n", same, lists);
  EXPECT_GE(same, lists / 2) << same << " of " << lists << " lists equal the CPU chain's";
}

}  // namespace
}  // namespace tw::attn::cuda
