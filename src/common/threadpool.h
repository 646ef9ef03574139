// Fork-join thread pool for the CPU kernels. parallel_for splits [0, n) into contiguous chunks,
// one per thread; the calling thread takes chunk 0. Workers spin briefly before sleeping, because
// a decode step issues hundreds of short parallel regions and a futex wake-up per region costs more
// than the work at small sizes.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tw {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);  // n_threads >= 1 (1 = run everything on the caller)
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_; }

  // fn(begin, end, thread_index) on disjoint chunks covering [0, n). Blocks until all are done.
  // Exceptions thrown by fn are rethrown on the caller (the first one).
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn);

  // Like parallel_for, with chunk boundaries rounded to multiples of `grain` (e.g. rows per tile).
  void parallel_for_grain(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t, int)>& fn);

 private:
  void worker(int idx);
  void run_chunk(int idx);

  int n_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  bool stop_ = false;
  // Current job.
  const std::function<void(int64_t, int64_t, int)>* fn_ = nullptr;
  int64_t n_items_ = 0;
  int64_t grain_ = 1;
  std::exception_ptr error_;
  std::mutex error_mu_;
};

// Default thread count: hardware threads (at least 1).
int default_threads();

}  // namespace tw
