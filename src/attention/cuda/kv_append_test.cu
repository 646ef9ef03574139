// kv_append (GPU) against the CPU cache: kv::KVPool::write + attention::KeySide::append fed the same
// K/V (fp16: bit-identical K/V, INT4 codes, scales and zeros; exact bounds), and against a host
// reference of the same definition for bf16. Random histories of several sequences on random pages,
// appended by explicit positions (with idle slots) and then by seq_len; constant rows (scale floor).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "attention/cuda/attn_test_util.h"
#include "attention/cuda/kv_append.h"
#include "attention/cuda/real_kv_test_util.h"
#include "attention/key_side.h"
#include "attention/page_bounds.h"
#include "common/fp16.h"
#include "kv/kv_cache.h"

namespace tw::attn::cuda {
namespace {

using namespace test;

// Device key side of n_pages pages, poisoned.
struct DevSide {
  DeviceBuffer bcode, bparam, k4, scale, zero;
  DevSide(int64_t n_pages, int hkv, int d)
      : bcode((size_t)n_pages * hkv * 2 * d), bparam((size_t)n_pages * hkv * 2 * 4),
        k4((size_t)n_pages * hkv * kPageSize * d / 2), scale((size_t)n_pages * hkv * kPageSize * 4), zero(scale.size()) {
    for (DeviceBuffer* b : {&bcode, &bparam, &k4, &scale, &zero}) TW_CUDA_CHECK(cudaMemset(b->get(), 0xFF, b->size()));
  }
  KeySideDev view() {
    return {bcode.as<uint8_t>(), bparam.as<float>(), k4.as<uint8_t>(), scale.as<float>(), zero.as<float>()};
  }
};

// Host mirror of everything kv_append writes, built by the reference path.
struct HostSide {
  std::vector<uint8_t> bcode;  // 8-bit page bounds (page_bounds.h)
  std::vector<float> bparam, scale, zero;
  std::vector<uint8_t> k4;
};

// Draws the K row of one token: normal, or (1 in 16) constant over the head dim, so the INT4
// scale takes its 1e-8 floor.
void draw_k(std::mt19937_64& rng, float* k, int n, float kscale) {
  std::normal_distribution<float> N(0.f, 1.f);
  if (rng() % 16 == 0) {
    const float c = N(rng);
    for (int i = 0; i < n; ++i) k[i] = c;
  } else {
    for (int i = 0; i < n; ++i) k[i] = N(rng) * kscale;
  }
}

// src (optional): the K and V rows of (sequence, position, kv head) instead of random ones.
using RowSource = std::function<void(int, int, int, float*, float*)>;

void run_case(std::mt19937_64& rng, KvDtype dt, int hkv, int d, const std::vector<int>& lens, int tail_steps,
              const RowSource& src = {}) {
  SCOPED_TRACE(cat(dtype_name(dt), " Hkv ", hkv, " d ", d, " batch ", lens.size()));
  const int batch = (int)lens.size();
  std::vector<int> final_len(lens);
  for (int& n : final_len) n += tail_steps;
  // Pages as in the dense tests (random permutation), but empty: the kernel fills them.
  PagedBatch pb = make_batch(rng, dt, hkv, hkv, d, final_len, 1.f);
  std::fill(pb.k.begin(), pb.k.end(), nan_bits(dt));
  std::fill(pb.v.begin(), pb.v.end(), nan_bits(dt));
  pb.seq_len.assign(batch, 0);
  pb.upload();
  DevSide side(pb.n_pages, hkv, d);

  // Reference: the CPU cache for fp16; for bf16 the same definition on bf16-rounded K.
  kv::KVPool pool({1, hkv, d, pb.n_pages});
  KeySide ks({1, hkv, d, pb.n_pages});
  std::vector<kv::SeqPages> seqs(batch);
  for (int b = 0; b < batch; ++b) {
    const int np = (final_len[b] + kPageSize - 1) / kPageSize;
    seqs[b].pages.assign(pb.page_table.begin() + (size_t)b * pb.max_pages,
                         pb.page_table.begin() + (size_t)b * pb.max_pages + np);
  }
  const size_t bound_elems = (size_t)pb.n_pages * hkv * d, slot_elems = (size_t)pb.n_pages * hkv * kPageSize;
  HostSide hs{std::vector<uint8_t>(2 * bound_elems), std::vector<float>(2 * bound_elems / d),
              std::vector<float>(slot_elems), std::vector<float>(slot_elems), std::vector<uint8_t>(slot_elems * d / 2)};

  std::vector<float> knew((size_t)batch * hkv * d), vnew(knew.size());
  std::vector<int32_t> pos(batch);
  DeviceBuffer dk(knew.size() * 4), dv(knew.size() * 4), dpos(batch * 4);
  std::normal_distribution<float> N(0.f, 1.f);
  const int max_len = *std::max_element(lens.begin(), lens.end());
  const int steps = max_len + tail_steps;
  for (int step = 0; step < steps; ++step) {
    const bool by_len = step >= max_len;  // tail: every sequence appends at seq_len - 1
    for (int b = 0; b < batch; ++b) {
      pos[b] = by_len ? lens[b] + (step - max_len) : (step < lens[b] ? step : -1);
      if (pos[b] < 0) continue;
      for (int h = 0; h < hkv; ++h) {
        float* kr = &knew[((size_t)b * hkv + h) * d];
        float* vr = &vnew[((size_t)b * hkv + h) * d];
        if (src) {
          src(b, pos[b], h, kr, vr);
          continue;
        }
        draw_k(rng, kr, d, 1.5f);
        for (int i = 0; i < d; ++i) vr[i] = N(rng);
      }
      if (dt == KvDtype::F16) {
        pool.write(0, seqs[b], pos[b], &knew[(size_t)b * hkv * d], &vnew[(size_t)b * hkv * d]);
        ks.append(pool, 0, seqs[b], pos[b]);
      }
      for (int h = 0; h < hkv; ++h) {  // the host mirror of the pool (both dtypes)
        const size_t r = pb.row(b, pos[b], h);
        for (int i = 0; i < d; ++i) {
          pb.k[r + i] = to_bits(dt, knew[((size_t)b * hkv + h) * d + i]);
          pb.v[r + i] = to_bits(dt, vnew[((size_t)b * hkv + h) * d + i]);
        }
      }
    }
    dk.upload(knew.data(), knew.size() * 4);
    dv.upload(vnew.data(), vnew.size() * 4);
    if (by_len) {
      std::vector<int32_t> len(batch);
      for (int b = 0; b < batch; ++b) len[b] = pos[b] + 1;
      pb.dlen.upload(len.data(), len.size() * 4);
      kv_append(pb.view(), side.view(), dk.as<float>(), dv.as<float>(), nullptr);
    } else {
      dpos.upload(pos.data(), pos.size() * 4);
      kv_append(pb.view(), side.view(), dk.as<float>(), dv.as<float>(), dpos.as<int32_t>());
    }
  }
  TW_CUDA_CHECK(cudaDeviceSynchronize());

  // Host reference of the side data (bf16: recompute; fp16: read the CPU KeySide).
  for (int b = 0; b < batch; ++b)
    for (int lp = 0; lp < (final_len[b] + kPageSize - 1) / kPageSize; ++lp) {
      const int32_t phys = seqs[b].pages[lp];
      const int last = std::min(kPageSize, final_len[b] - lp * kPageSize) - 1;
      for (int h = 0; h < hkv; ++h) {
        const size_t bo = ((size_t)phys * hkv + h) * d, so = ((size_t)phys * hkv + h) * kPageSize;
        if (dt == KvDtype::F16) {
          std::copy_n(ks.bound_codes(0, phys, h), 2 * d, &hs.bcode[2 * bo]);
          std::copy_n(ks.bound_param(0, phys, h), 2, &hs.bparam[2 * bo / d]);
          std::copy_n(ks.k4_scale(0, phys, h), kPageSize, &hs.scale[so]);
          std::copy_n(ks.k4_zero(0, phys, h), kPageSize, &hs.zero[so]);
          std::copy_n(ks.k4(0, phys, h), kPageSize * d / 2, &hs.k4[so * d / 2]);
        } else {
          std::vector<float> row(d), mn(d), mx(d);
          for (int j = 0; j <= last; ++j) {
            const size_t r = pb.row(b, lp * kPageSize + j, h);
            for (int i = 0; i < d; ++i) {
              row[i] = from_bits(dt, pb.k[r + i]);
              mn[i] = j == 0 ? row[i] : std::min(mn[i], row[i]);
              mx[i] = j == 0 ? row[i] : std::max(mx[i], row[i]);
            }
            int4_quantize_ref(row.data(), d, &hs.k4[(so + j) * d / 2], &hs.scale[so + j], &hs.zero[so + j]);
          }
          quantize_page_bounds(mn.data(), mx.data(), d, &hs.bcode[2 * bo], &hs.bparam[2 * bo / d]);
        }
      }
    }

  const auto gk = to_host<uint16_t>(pb.dk, pb.k.size()), gv = to_host<uint16_t>(pb.dv, pb.v.size());
  const auto gcode = to_host<uint8_t>(side.bcode, 2 * bound_elems);
  const auto gparam = to_host<float>(side.bparam, 2 * bound_elems / d);
  const auto gk4 = to_host<uint8_t>(side.k4, slot_elems * d / 2);
  const auto gscale = to_host<float>(side.scale, slot_elems), gzero = to_host<float>(side.zero, slot_elems);
  int bad = 0;
  auto expect = [&](bool ok, const std::string& what) {
    if (!ok && ++bad <= 10) ADD_FAILURE() << what;
  };
  for (int b = 0; b < batch; ++b)
    for (int t = 0; t < final_len[b]; ++t)
      for (int h = 0; h < hkv; ++h) {
        const size_t r = pb.row(b, t, h);
        const int32_t phys = seqs[b].pages[t / kPageSize];
        const size_t so = ((size_t)phys * hkv + h) * kPageSize + t % kPageSize;
        const std::string at = cat(" of seq ", b, " token ", t, " head ", h);
        // K/V: the pool the kernel wrote == the CPU pool (fp16) and the host mirror.
        expect(std::memcmp(&gk[r], &pb.k[r], d * 2) == 0, "K" + at);
        expect(std::memcmp(&gv[r], &pb.v[r], d * 2) == 0, "V" + at);
        if (dt == KvDtype::F16) {
          const uint16_t* cpu_k = pool.k_page(0, phys, h) + (size_t)(t % kPageSize) * d;
          expect(std::memcmp(&gk[r], cpu_k, d * 2) == 0, "K differs from the CPU pool" + at);
        }
        expect(std::memcmp(&gk4[so * d / 2], &hs.k4[so * d / 2], d / 2) == 0, "INT4 codes" + at);
        expect(std::memcmp(&gscale[so], &hs.scale[so], 4) == 0,
               cat("INT4 scale", at, ": gpu ", gscale[so], " ref ", hs.scale[so]));
        expect(std::memcmp(&gzero[so], &hs.zero[so], 4) == 0,
               cat("INT4 zero", at, ": gpu ", gzero[so], " ref ", hs.zero[so]));
      }
  for (int b = 0; b < batch; ++b)
    for (int lp = 0; lp < (final_len[b] + kPageSize - 1) / kPageSize; ++lp)
      for (int h = 0; h < hkv; ++h) {
        const size_t ph = (size_t)seqs[b].pages[lp] * hkv + h;
        const std::string at = cat(" seq ", b, " page ", lp, " head ", h);
        expect(std::memcmp(&gparam[2 * ph], &hs.bparam[2 * ph], 8) == 0,
               cat("bound {lo, s}", at, ": gpu ", gparam[2 * ph], " ", gparam[2 * ph + 1], " ref ", hs.bparam[2 * ph], " ",
                   hs.bparam[2 * ph + 1]));
        for (int i = 0; i < 2 * d; ++i)
          expect(gcode[2 * ph * d + i] == hs.bcode[2 * ph * d + i],
                 cat(i < d ? "min" : "max", " bound code", at, " dim ", i % d, ": gpu ", (int)gcode[2 * ph * d + i],
                     " ref ", (int)hs.bcode[2 * ph * d + i]));
      }
  EXPECT_EQ(bad, 0);
}

TEST(KvAppendCuda, MatchesCpuKeySide) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> len(1, 90);
  for (KvDtype dt : {KvDtype::F16, KvDtype::BF16})
    for (int d : {64, 128})
      for (int hkv : {1, 3}) {
        std::vector<int> lens = {len(rng), len(rng), 16, 1, len(rng)};
        run_case(rng, dt, hkv, d, lens, 20);
      }
}

// The real model's K / V (TW_REAL_KV, real_kv_test_util.h): dumped layer b for sequence b, appended token
// by token to the dump's length and past it (tiled), for both KV dtypes.
TEST(KvAppendCuda, RealModelDump) {
  TW_REQUIRE_CUDA_DEVICE();
  TW_REQUIRE_REAL_KV();
  const kv::KVDump& dump = *real::dump();
  const int n = (int)dump.info.n_tokens;
  SCOPED_TRACE(cat("real KV: ", dump.info.model_name, ", ", n, " tokens"));
  const uint64_t seed = fresh_seed();  // the pages' placement only
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  const RowSource src = [&](int b, int pos, int h, float* k, float* v) {
    real::row(dump, real::standard_layer(dump, b), pos, h, k, v);
  };
  for (KvDtype dt : {KvDtype::F16, KvDtype::BF16})
    run_case(rng, dt, dump.info.n_kv_heads, dump.info.head_dim, {n, std::max(1, n * 5 / 8), std::max(1, n / 7), 1}, 20,
             src);
}

// K/V only (no key side), and the pools of idle slots (negative position) stay untouched.
TEST(KvAppendCuda, WithoutKeySideAndIdleSlots) {
  TW_REQUIRE_CUDA_DEVICE();
  std::mt19937_64 rng(fresh_seed());
  PagedBatch pb = make_batch(rng, KvDtype::BF16, 2, 2, 64, {20, 35}, 1.f);
  const auto before = pb.k;
  pb.upload();
  std::vector<float> knew(2 * 2 * 64), vnew(knew.size());
  for (size_t i = 0; i < knew.size(); ++i) knew[i] = 0.25f * (float)(i % 13), vnew[i] = -0.5f * (float)(i % 7);
  DeviceBuffer dk = to_device(knew), dv = to_device(vnew);
  const std::vector<int32_t> pos = {-1, 34};
  DeviceBuffer dpos = to_device(pos);
  kv_append(pb.view(), KeySideDev{}, dk.as<float>(), dv.as<float>(), dpos.as<int32_t>());
  const auto gk = to_host<uint16_t>(pb.dk, pb.k.size()), gv = to_host<uint16_t>(pb.dv, pb.v.size());
  for (int h = 0; h < 2; ++h) {
    const size_t r = pb.row(1, 34, h);
    for (int i = 0; i < 64; ++i) {
      pb.k[r + i] = to_bits(KvDtype::BF16, knew[(2 + h) * 64 + i]);
      pb.v[r + i] = to_bits(KvDtype::BF16, vnew[(2 + h) * 64 + i]);
    }
  }
  EXPECT_TRUE(gk == pb.k) << "K pool differs (idle slot written, or the new token misplaced)";
  EXPECT_TRUE(gv == pb.v) << "V pool differs";
  EXPECT_FALSE(gk == before) << "nothing was written";
}

TEST(KvAppendCuda, BadInputIsAnError) {
  TW_REQUIRE_CUDA_DEVICE();
  std::mt19937_64 rng(fresh_seed());
  PagedBatch pb = make_batch(rng, KvDtype::F16, 2, 2, 64, {20}, 1.f);
  pb.upload();
  DeviceBuffer dk(2 * 64 * 4), dv(2 * 64 * 4), k4(1024);
  KeySideDev partial;
  partial.k4 = k4.as<uint8_t>();
  ::tw::cuda::test::expect_error(
      [&] { kv_append(pb.view(), partial, dk.as<float>(), dv.as<float>(), nullptr); }, "1 of 5 set");
  ::tw::cuda::test::expect_error(
      [&] { kv_append(pb.view(), KeySideDev{}, nullptr, dv.as<float>(), nullptr); }, "null new K or V");
  PagedKV kv = pb.view();
  kv.head_dim = 256;
  ::tw::cuda::test::expect_error(
      [&] { kv_append(kv, KeySideDev{}, dk.as<float>(), dv.as<float>(), nullptr); }, "head_dim 256");
}

}  // namespace
}  // namespace tw::attn::cuda
