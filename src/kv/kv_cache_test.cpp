#include "kv/kv_cache.h"

#include <gtest/gtest.h>

#include "common/error.h"
#include "common/fp16.h"

namespace tw::kv {
namespace {

TEST(KVPool, PagesAreContiguousPerHeadAndRoundTrip) {
  KVPool pool({2, 3, 8, 4});
  SeqPages seq;
  pool.reserve(seq, 40);  // 3 pages
  ASSERT_EQ(seq.pages.size(), 3u);
  EXPECT_EQ(pool.free_pages(), 1);
  float k[24], v[24];
  for (int64_t t = 0; t < 40; ++t) {
    for (int i = 0; i < 24; ++i) {
      k[i] = (float)(t * 100 + i);
      v[i] = -(float)(t * 100 + i);
    }
    pool.write(1, seq, t, k, v);
  }
  for (int64_t t = 0; t < 40; ++t)
    for (int h = 0; h < 3; ++h)
      for (int i = 0; i < 8; ++i) {
        const uint16_t* kp = pool.k_page(1, seq.pages[t / kPageSize], h);
        const uint16_t* vp = pool.v_page(1, seq.pages[t / kPageSize], h);
        EXPECT_EQ(fp16_to_fp32(kp[(t % kPageSize) * 8 + i]), fp16_to_fp32(fp32_to_fp16((float)(t * 100 + h * 8 + i))));
        EXPECT_EQ(fp16_to_fp32(vp[(t % kPageSize) * 8 + i]), fp16_to_fp32(fp32_to_fp16(-(float)(t * 100 + h * 8 + i))));
      }
}

TEST(KVPool, FullPoolIsAClearError) {
  KVPool pool({1, 1, 4, 2});
  SeqPages a;
  pool.reserve(a, 32);
  SeqPages b;
  EXPECT_THROW(pool.reserve(b, 1), Error);
  pool.release(a);
  EXPECT_EQ(pool.free_pages(), 2);
  EXPECT_NO_THROW(pool.reserve(b, 17));
  EXPECT_THROW(pool.write(0, b, 40, nullptr, nullptr), Error);  // not reserved
}

}  // namespace
}  // namespace tw::kv
