// Device query and a minimal owning device buffer. Host-side API, usable from plain C++ files.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>

namespace tw::cuda {

// Number of usable CUDA devices; 0 when there is no device or no driver (never throws), so
// callers and tests can fall back or skip.
int device_count();
inline bool available() { return device_count() > 0; }

struct DeviceInfo {
  std::string name;
  int cc_major = 0, cc_minor = 0;  // compute capability (9.0 for H100/H200)
  int sm_count = 0;
  size_t l2_bytes = 0;
  size_t mem_bytes = 0;            // total global memory
  size_t smem_per_block_optin = 0; // largest dynamic shared memory a block may opt into
};
// Throws tw::Error when the device does not exist.
DeviceInfo device_info(int device = 0);
std::string describe(const DeviceInfo& d);  // one line, for logs

// Owns one cudaMalloc allocation (256-byte aligned). Move-only; freed in the destructor.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; o.bytes_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return ptr_; }
  template <typename T> T* as() const { return static_cast<T*>(ptr_); }
  size_t size() const { return bytes_; }

  // Synchronous copies; n bytes must fit the buffer (checked).
  void upload(const void* host, size_t n, size_t offset = 0);
  void download(void* host, size_t n, size_t offset = 0) const;

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace tw::cuda
