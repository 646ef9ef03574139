// Large arrays that want 2 MiB pages: the KV pool and the key-side structures are read at scattered
// pages (selected tokens, Quest pages), where 4 KiB pages cost a TLB miss per access. 2-core EPYC,
// Qwen2.5-Coder-1.5B at 32k (twilight bench --attention, three alternations): dense attention -4%,
// Twilight's sparse attend -5%, its INT4 estimate -2..-15%. TW_NO_HUGE_PAGES=1 turns the advice off.
#pragma once
#include <sys/mman.h>

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

namespace tw {

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <class T>
using HugeBuf = std::unique_ptr<T[], FreeDeleter>;

// n uninitialised T. From 2 MiB up: 2 MiB aligned and advised as huge pages (transparent huge pages
// in "madvise" mode, Debian's default; the memory is still mapped lazily, as first written).
template <class T>
HugeBuf<T> huge_buf(size_t n) {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = n > 0 ? n * sizeof(T) : 1;  // aligned_alloc(a, 0) may return null
  const bool huge = bytes >= kHuge && !std::getenv("TW_NO_HUGE_PAGES");  // the knob: A/B in benchmarks
  const size_t align = huge ? kHuge : 64;
  void* p = std::aligned_alloc(align, (bytes + align - 1) / align * align);
  if (!p) throw std::bad_alloc();
  if (huge) (void)madvise(p, (bytes + align - 1) / align * align, MADV_HUGEPAGE);  // a hint: failure is harmless
  return HugeBuf<T>(static_cast<T*>(p));
}

}  // namespace tw
