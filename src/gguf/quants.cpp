#include "gguf/quants.h"

#include "common/error.h"
#include "common/fp16.h"

namespace tw::gguf {

TypeTraits type_traits(uint32_t id) {
  switch (static_cast<Type>(id)) {
    case Type::F32: return {"F32", 1, 4, true};
    case Type::F16: return {"F16", 1, 2, true};
    case Type::BF16: return {"BF16", 1, 2, true};
    case Type::Q4_0: return {"Q4_0", QK, sizeof(block_q4_0), true};
    case Type::Q4_1: return {"Q4_1", QK, sizeof(block_q4_1), true};
    case Type::Q5_0: return {"Q5_0", QK, sizeof(block_q5_0), true};
    case Type::Q5_1: return {"Q5_1", QK, sizeof(block_q5_1), true};
    case Type::Q8_0: return {"Q8_0", QK, sizeof(block_q8_0), true};
    case Type::Q8_1: return {"Q8_1", QK, sizeof(block_q8_1), false};
    case Type::Q2_K: return {"Q2_K", QK_K, 84, false};
    case Type::Q3_K: return {"Q3_K", QK_K, 110, false};
    case Type::Q4_K: return {"Q4_K", QK_K, sizeof(block_q4_K), true};
    case Type::Q5_K: return {"Q5_K", QK_K, sizeof(block_q5_K), true};
    case Type::Q6_K: return {"Q6_K", QK_K, sizeof(block_q6_K), true};
    case Type::Q8_K: return {"Q8_K", QK_K, sizeof(block_q8_K), false};
  }
  return {"unknown", 0, 0, false};
}

// dequantize_row: implemented below (reference scalar code, one function per block type).

}  // namespace tw::gguf
