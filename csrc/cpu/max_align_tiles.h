// Shared chores of the fused CPU max-pooling kernel: packing valid tokens, grouping whole
// items into tiles, checking lengths.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace hatkernels::cpu::HATK_CPU_LEVEL::max_tiles {

// Where the valid tokens of one side lie: item b's tokens are packed rows [off[b], off[b + 1]).
struct Packed {
  std::vector<int64_t> off;     // size items + 1
  std::vector<int32_t> owner;   // packed row -> item
  int64_t rows = 0;
};

// Where a gradient row of one side goes: straight into the [items, max_len, d] gradient, or
// into a chunk's partial holding the rows [first, ...) of one step.
struct RowDest {
  float* base;
  const Packed* packed;
  int64_t max_len, d, first;
  bool direct;
  float* row(int64_t r) const {
    if (!direct) return base + (r - first) * d;
    const int64_t b = packed->owner[r];
    return base + (b * max_len + r - packed->off[b]) * d;
  }
};

inline void check_lengths(const int64_t* len, int64_t items, int64_t max_len, const char* name) {
  for (int64_t b = 0; b < items; ++b) {
    if (len[b] < 1 || len[b] > max_len) {
      throw std::invalid_argument(std::string(name) + "[" + std::to_string(b) + "] = " +
                                  std::to_string(len[b]) + " outside [1, " +
                                  std::to_string(max_len) + "]");
    }
  }
}

inline Packed index_valid(const int64_t* len, int64_t items) {
  Packed p;
  p.off.resize(items + 1);
  p.off[0] = 0;
  for (int64_t b = 0; b < items; ++b) p.off[b + 1] = p.off[b] + len[b];
  p.rows = p.off[items];
  p.owner.resize(p.rows);
  for (int64_t b = 0; b < items; ++b)
    std::fill(p.owner.begin() + p.off[b], p.owner.begin() + p.off[b + 1], static_cast<int32_t>(b));
  return p;
}

// Consecutive items whose tokens add up to at most `target` rows (always at least one item):
// returns the item boundaries g[0] = 0 < g[1] < ... = items.
inline std::vector<int64_t> group_items(const std::vector<int64_t>& off, int64_t target) {
  const int64_t items = static_cast<int64_t>(off.size()) - 1;
  std::vector<int64_t> g{0};
  for (int64_t b = 0; b < items;) {
    int64_t e = b + 1;
    while (e < items && off[e + 1] - off[b] <= target) ++e;
    g.push_back(e);
    b = e;
  }
  return g;
}

// The most rows any group holds (sizes the per-thread buffers).
inline int64_t max_group_rows(const std::vector<int64_t>& g, const std::vector<int64_t>& off) {
  int64_t most = 0;
  for (size_t k = 0; k + 1 < g.size(); ++k) most = std::max(most, off[g[k + 1]] - off[g[k]]);
  return most;
}

// An uninitialised float buffer for per-thread scratch (reused across tiles).
inline std::unique_ptr<float[]> scratch(int64_t n) {
  return std::unique_ptr<float[]>(new float[std::max<int64_t>(n, 1)]);
}

}  // namespace hatkernels::cpu::HATK_CPU_LEVEL::max_tiles
