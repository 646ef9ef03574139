#include "ops/cuda/device.h"

#include <utility>

#include "ops/cuda/cuda_check.h"

namespace tw::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no device / no driver" error
    return 0;
  }
  return n;
}

DeviceInfo device_info(int device) {
  const int n = device_count();
  TW_CHECK(device >= 0 && device < n, "CUDA device ", device, " does not exist (", n, " device(s) found)");
  cudaDeviceProp p{};
  TW_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  DeviceInfo d;
  d.name = p.name;
  d.cc_major = p.major;
  d.cc_minor = p.minor;
  d.sm_count = p.multiProcessorCount;
  d.l2_bytes = static_cast<size_t>(p.l2CacheSize);
  d.mem_bytes = p.totalGlobalMem;
  d.smem_per_block_optin = p.sharedMemPerBlockOptin;
  return d;
}

std::string describe(const DeviceInfo& d) {
  return cat(d.name, " (sm_", d.cc_major, d.cc_minor, ", ", d.sm_count, " SMs, L2 ", d.l2_bytes >> 20, " MiB, ",
             d.mem_bytes >> 20, " MiB)");
}

DeviceBuffer::DeviceBuffer(size_t bytes) : bytes_(bytes) {
  if (bytes > 0) TW_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_) cudaFree(ptr_);  // no throwing from a destructor; a failed free is not recoverable anyway
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (ptr_) cudaFree(ptr_);
    ptr_ = std::exchange(o.ptr_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

void DeviceBuffer::upload(const void* host, size_t n, size_t offset) {
  TW_CHECK(offset <= bytes_ && n <= bytes_ - offset, "DeviceBuffer::upload: ", n, " bytes at offset ", offset,
           " do not fit a buffer of ", bytes_);
  if (n) TW_CUDA_CHECK(cudaMemcpy(static_cast<char*>(ptr_) + offset, host, n, cudaMemcpyHostToDevice));
}

void DeviceBuffer::download(void* host, size_t n, size_t offset) const {
  TW_CHECK(offset <= bytes_ && n <= bytes_ - offset, "DeviceBuffer::download: ", n, " bytes at offset ", offset,
           " do not fit a buffer of ", bytes_);
  if (n) TW_CUDA_CHECK(cudaMemcpy(host, static_cast<const char*>(ptr_) + offset, n, cudaMemcpyDeviceToHost));
}

}  // namespace tw::cuda
