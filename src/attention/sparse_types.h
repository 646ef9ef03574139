// Shared types of the sparse attention path (Twilight, TWILIGHT.md): the candidate / kept token
// lists that selectors produce, the pruner shrinks and sparse attention consumes.
#pragma once
#include <cstdint>
#include <vector>

namespace tw::attn {

// How lists map to query heads under GQA (G = H / Hkv query heads per kv head).
//  Group: one list per kv head, shared by its G query heads (what a fast kernel wants: K/V read once).
//  Head:  one list per query head (more precise, loses the sharing).
enum class GqaMode { Group, Head };

// Token lists for one layer of one sequence, flat: list i holds
// tokens[offsets[i] .. offsets[i+1]), token positions in [0, n_ctx), ascending, no duplicates.
struct Selection {
  GqaMode mode = GqaMode::Group;
  int n_lists = 0;               // Hkv (Group) or H (Head)
  std::vector<int32_t> offsets;  // (n_lists + 1) prefix sums
  std::vector<int32_t> tokens;   // (offsets[n_lists])

  int64_t size(int i) const { return offsets[i + 1] - offsets[i]; }
  const int32_t* list(int i) const { return tokens.data() + offsets[i]; }
  void clear(GqaMode m, int n) {
    mode = m;
    n_lists = n;
    offsets.assign(1, 0);
    tokens.clear();
  }
  // Append one list (positions ascending); call n_lists times after clear().
  void push_list(const int32_t* t, int64_t n) {
    tokens.insert(tokens.end(), t, t + n);
    offsets.push_back((int32_t)tokens.size());
  }
};

}  // namespace tw::attn
