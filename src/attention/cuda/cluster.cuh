// Thread-block-cluster helpers of the kernels that split one list over a cluster (Quest select,
// pruner): a cluster of one block (the list fits one block, or more lists than resident clusters)
// needs neither cluster barriers nor distributed shared memory.
#pragma once
#include <cooperative_groups.h>

namespace tw::attn::cuda {

// A cluster-wide barrier; a one-block cluster needs only the block's.
__device__ __forceinline__ void cluster_sync(cooperative_groups::cluster_group& cl, int C) {
  if (C == 1)
    __syncthreads();
  else
    cl.sync();
}

// Block r's copy of a shared-memory field (its own copy without a distributed-shared-memory load).
template <class T>
__device__ __forceinline__ T* block_field(cooperative_groups::cluster_group& cl, int C, T* p, int r) {
  return C == 1 ? p : cl.map_shared_rank(p, r);
}

}  // namespace tw::attn::cuda
