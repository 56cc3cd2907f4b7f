// Fused max pooling on CPU, forward and backward (one instruction-set level: isa.h).
//
// Tiling. Only valid tokens are ever read or multiplied: images are grouped into runs of
// whole images of at most kTileRows tokens, captions into runs of whole captions of at most
// kTileCols words, and a tile is (image group x caption group), so no tile needs a merge
// with another. The operands are packed once per call (max_align_gemm.h; a screened forward
// packs a group's float32 operand only when one of its tiles falls back): with AVX-512,
// image tokens into 12-row blocks and each caption group's words into 32-word strips, both
// k-major, and a 12 x 32 register-blocked micro-kernel computes the tile's similarities
// C [rows, cols] with no per-tile packing; otherwise the valid tokens are packed row-major and
// MKL's sgemm_ computes C. C goes into a per-thread buffer reused for every tile (400 x 384
// floats, 0.6 MiB; with the two operand panels it stays in the 2 MiB L2) and is pooled while
// hot: t2i takes a vector max down each image's rows, then a sum per caption; i2t runs as
// t2i of (texts, images) written transposed, so it gets the same vector max; both does
// t2i and, from the same C, a max along each caption's words per image token. The tile then
// writes its [images, captions] block of the output. OpenMP over tiles (dynamic schedule);
// each thread pins the BLAS to one thread (restored after).
//
// Winners. A forward whose caller needs gradients may also keep every query token's winner,
// so that the backward needs no similarities. The int32 array (max_align_winners_size
// entries, valid tokens only, packed as Plan's Packed index them) is, for the problem the
// kernel runs (i2t runs as t2i of (texts, images), so its winners are that problem's t2i
// section, per caption and valid image token):
//   t2i section (directions t2i and both): [bi][words], words = all valid words of all
//     captions in order; entry (i, w) = the row within image i (0 .. m_i - 1) of the image
//     token that word w's maximum comes from;
//   i2t section (direction both, after the t2i one): [rows][bt], rows = all valid image
//     tokens in order; entry (r, j) = the word within caption j (0 .. n_j - 1) of token r's
//     maximum;
//   last entry: 1 when some entry above is kTied, else 0.
// kTied (-1) marks a query token whose maximum is not reached by exactly one token (exact
// ties, or a NaN similarity). The t2i winners come from the same pass as the max
// (max_pool::column_winners: a row that beats the best so far becomes the winner, one that
// equals it makes a tie; the screened forward's from its candidates, max_align_screen.h) and
// are written per image and tile by store_t2i_winners; both's
// i2t winners come from each caption segment's max (sole_argmax).
// Keeping them costs the forward about 1.5% (W1, t2i), 4 bytes per query token and pair.
//
// Backward from saved winners (the usual case with gradients): max_align_scatter.h gathers
// each query token's gradient from its winners and scatters each key row's from the query
// tokens it won, every gradient row summed by one task in a fixed order (bit-identical at any
// thread count). Query tokens marked kTied are left to the tile path below, run only over the
// tiles that hold one (their operands packed lazily).
//
// Backward by tiles (without saved winners, and for tied query tokens): every tile finds each
// query token's winners from its C, recomputed (the same tiles and the same GEMM as the
// forward, so the same values and the same ties). Exact ties share the gradient equally (as
// torch's amax does). It then scatters: a t2i winner (image token r, word w) with coefficient
// a adds a T[w] to dV[r] and a V[r] to dT[w] (i2t the same with the roles swapped). That is
// 4 D flops per query token and item, 2/m (or 2/n) of the forward GEMM, so dense dS GEMMs
// would cost more than they save. Race-free without atomics: a task owns one group of the
// "parallel" side (images for t2i and both, captions for i2t, the side whose rows the
// scattered winners hit, kept hot in L2) and runs it against every group of the other side,
// whose gradient rows go to partials. Deterministic: the parallel side's groups are cut into
// fixed chunks (two per thread), each with its own partial (chunk 0's is the gradient
// itself), run on one thread in order, and the partials are summed in chunk order after one
// barrier (steps of several barriers only when chunks x partial rows exceed
// kPartialBudget); so a given thread count gives bit-identical gradients from run to run,
// whatever the scheduling. Tiles whose output-gradient block is all zero are skipped.
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/max_align.h"
#include "cpu/max_align_amx.h"
#include "cpu/max_align_gemm.h"
#include "cpu/max_align_pool.h"
#include "cpu/max_align_scatter.h"
#include "cpu/max_align_screen.h"
#include "cpu/max_align_tiles.h"

namespace hatkernels::cpu::HATK_CPU_LEVEL::max_kernel {

namespace {

using max_tiles::Packed;
using max_tiles::RowDest;

// Tile targets (tokens): tiles hold C and both operand panels in L2.
constexpr int64_t kTileRows = 400, kTileCols = 384;
constexpr int64_t kBackwardRows = 400, kBackwardCols = 384;
// Screened tiles without AMX hold more images: their words' float32 rows, which the
// candidates' dot products read, come from memory once for every 32 images of 49 tokens rather
// than every 8 (W1 with AVX-512 VNNI: 1,600 rows took 0.87 of 400's time, 3,200 0.90).
// Their int8 GEMM runs kScreenGroup images at a time, so their similarities take little room.
constexpr int64_t kScreenTileRows = 1600, kScreenGroup = 4;
// Bytes of gradient partials (all chunks together) per backward step
// (overridable at build time so that tests can force many steps).
#ifndef HATK_MAX_PARTIAL_BUDGET
#define HATK_MAX_PARTIAL_BUDGET (int64_t{128} << 20)
#endif
constexpr int64_t kPartialBudget = HATK_MAX_PARTIAL_BUDGET;
// Backward chunks (runs of parallel-side groups with their own partial) per thread.
constexpr int64_t kChunksPerThread = 2;

struct Plan {
  Packed v, t;
  std::vector<int64_t> ig, cg;  // group boundaries (items)
  int64_t max_rows = 0, max_cols = 0, max_caps = 0, max_imgs = 0;
  int64_t si = 0, sj = 0;  // out[i, j] / grad_out[i, j] at i * si + j * sj
  max_gemm::Rows v_rows, t_rows;  // valid rows read straight from the inputs
  // GEMM operands: register-blocked panels (AVX-512) or row-major packed valid tokens.
  max_gemm::AlignedFloats a, b;
  std::vector<int64_t> b_start;  // per caption group: first float of its operand in b
#if HATK_CPU_AVX512
  // Screened forward only (max_align_screen.h): int8 codes of both sides and their panels,
  // laid out as a and b with d4 = ceil(d / 4) words per token instead of d floats.
  max_screen::Codes qv, qt;
  std::vector<int32_t> a8, b8;
#endif
  // A screened forward packs a group's float32 operand only when one of its tiles falls back:
  // lazy[k] (image groups, then caption groups) is 0 before, 1 while and 2 after packing. Null:
  // every group was packed by make_plan (or none is needed).
  std::unique_ptr<std::atomic<int>[]> lazy;
};

// The rows and columns of group k: image group k for k < the number of image groups, else
// caption group k - that number.
struct Group {
  bool images;
  int64_t index, first, count;
};

Group group_of(const Plan& plan, int64_t k) {
  const int64_t n_ig = static_cast<int64_t>(plan.ig.size()) - 1;
  if (k < n_ig) return {true, k, plan.v.off[plan.ig[k]], plan.v.off[plan.ig[k + 1]] - plan.v.off[plan.ig[k]]};
  const int64_t g = k - n_ig;
  return {false, g, plan.t.off[plan.cg[g]], plan.t.off[plan.cg[g + 1]] - plan.t.off[plan.cg[g]]};
}

// Packs group k's float32 operand (the panels live behind pointers: a const plan can be
// filled lazily, see ensure_packed).
void pack_float_group(const Plan& plan, int64_t k) {
  const Group gr = group_of(plan, k);
  const int64_t d = plan.v_rows.d;
  const max_gemm::Rows& src = gr.images ? plan.v_rows : plan.t_rows;
  float* dst = gr.images ? plan.a.get() : plan.b.get() + plan.b_start[gr.index];
  if constexpr (max_gemm::kPanels) {
    if (gr.images)
      max_gemm::pack_row_blocks(src, gr.first, gr.count, dst);
    else
      max_gemm::pack_col_strips(src, gr.first, gr.count, dst);
  } else {
    float* row0 = gr.images ? dst + gr.first * d : dst;
    for (int64_t r = 0; r < gr.count; ++r)
      std::memcpy(row0 + r * d, src.row(gr.first + r), sizeof(float) * d);
  }
}

#if HATK_CPU_AVX512
// Packs group k's int8 codes (screened forwards): image codes into row blocks for the VNNI
// micro-kernel (AMX reads them row-major from the codes), word codes into strips.
void pack_int8_group(Plan& plan, int64_t k) {
  const Group gr = group_of(plan, k);
  if (gr.images) {
    if (!plan.a8.empty()) max_gemm::pack_row_blocks(plan.qv, gr.first, gr.count, plan.a8.data());
    return;
  }
  max_gemm::pack_col_strips(plan.qt, gr.first, gr.count,
                            plan.b8.data() + plan.b_start[gr.index] / plan.v_rows.d * plan.qv.d4);
}
#endif

// How make_plan prepares the float32 GEMM operands: not at all (no tile's C will be needed),
// lazily (per group, by the first tile that needs C: ensure_packed), or all at once.
enum class Pack { kNone, kLazy, kNow };

Plan make_plan(const Problem& p, int64_t tile_rows, int64_t tile_cols, bool transposed,
               Pack pack, bool screen = false) {
  Plan plan;
  plan.si = transposed ? 1 : p.bt;
  plan.sj = transposed ? p.bi : 1;
  plan.v = max_tiles::index_valid(p.image_lengths, p.bi);
  plan.t = max_tiles::index_valid(p.text_lengths, p.bt);
  plan.ig = max_tiles::group_items(plan.v.off, tile_rows);
  plan.cg = max_tiles::group_items(plan.t.off, tile_cols);
  plan.max_rows = max_tiles::max_group_rows(plan.ig, plan.v.off);
  plan.max_cols = max_tiles::max_group_rows(plan.cg, plan.t.off);
  for (size_t k = 0; k + 1 < plan.cg.size(); ++k)
    plan.max_caps = std::max(plan.max_caps, plan.cg[k + 1] - plan.cg[k]);
  for (size_t k = 0; k + 1 < plan.ig.size(); ++k)
    plan.max_imgs = std::max(plan.max_imgs, plan.ig[k + 1] - plan.ig[k]);
  plan.v_rows = {p.images, plan.v.off.data(), plan.v.owner.data(), p.m_max, p.d};
  plan.t_rows = {p.texts, plan.t.off.data(), plan.t.owner.data(), p.n_max, p.d};

  const int64_t d = p.d, n_ig = plan.ig.size() - 1, n_cg = plan.cg.size() - 1;
  const int64_t pad = max_gemm::kPanels ? max_gemm::kNR : 1;
  plan.b_start.assign(n_cg + 1, 0);
  for (int64_t g = 0; g < n_cg; ++g) {
    const int64_t cols = plan.t.off[plan.cg[g + 1]] - plan.t.off[plan.cg[g]];
    plan.b_start[g + 1] = plan.b_start[g] + (cols + pad - 1) / pad * pad * d;
  }
  plan.a = max_gemm::aligned_floats(pack != Pack::kNone ? plan.v.rows * d : 0);
  plan.b = max_gemm::aligned_floats(pack != Pack::kNone ? plan.b_start[n_cg] : 0);
#if HATK_CPU_AVX512
  if (screen) {
    const int64_t multiple = p.amx ? max_amx::kWordsPerStep : 1;
    plan.qv = max_screen::quantise(plan.v_rows, plan.v.rows, plan.v.off.data(), p.bi, multiple,
                                   p.amx ? max_amx::kBlock : 0);
    plan.qt = max_screen::quantise(plan.t_rows, plan.t.rows, nullptr, 0, multiple);
    if (!p.amx) plan.a8.resize(plan.v.rows * plan.qv.d4);
    plan.b8.resize(plan.b_start[n_cg] / d * plan.qv.d4);
  }
#else
  (void)screen;
#endif
  if (pack == Pack::kLazy) plan.lazy = std::make_unique<std::atomic<int>[]>(n_ig + n_cg);
  const bool float32 = pack == Pack::kNow;
  const int64_t n_pack = float32 || screen ? n_ig + n_cg : 0;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t k = 0; k < n_pack; ++k) {
    if (float32) pack_float_group(plan, k);
#if HATK_CPU_AVX512
    if (screen) pack_int8_group(plan, k);
#endif
  }
  return plan;
}

// The tile's similarities C [rows, cols] for image group a and caption group b.
struct Tile {
  int64_t a, b, i0, i1, j0, j1, r0, rows, w0, cols;
};

Tile tile_of(const Plan& plan, int64_t a, int64_t b) {
  Tile t{a, b, plan.ig[a], plan.ig[a + 1], plan.cg[b], plan.cg[b + 1], 0, 0, 0, 0};
  t.r0 = plan.v.off[t.i0];
  t.rows = plan.v.off[t.i1] - t.r0;
  t.w0 = plan.t.off[t.j0];
  t.cols = plan.t.off[t.j1] - t.w0;
  return t;
}

// Packs tile t's float32 operands if they were left to be packed lazily (screened forwards);
// a thread that finds a group being packed by another waits for it.
void ensure_packed(const Plan& plan, const Tile& t) {
  if (!plan.lazy) return;
  const int64_t n_ig = static_cast<int64_t>(plan.ig.size()) - 1;
  for (const int64_t k : {t.a, n_ig + t.b}) {
    std::atomic<int>& state = plan.lazy[k];
    int expected = 0;
    if (state.load(std::memory_order_acquire) == 2) continue;
    if (state.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
      pack_float_group(plan, k);
      state.store(2, std::memory_order_release);
      continue;
    }
    while (state.load(std::memory_order_acquire) != 2) std::this_thread::yield();
  }
}

void similarities(const Plan& plan, const Tile& t, int64_t d, float* c) {
  const float* a = plan.a.get() + t.r0 * d;
  const float* b = plan.b.get() + plan.b_start[t.b];
#if HATK_CPU_AVX512
  max_gemm::panel_gemm(a, t.rows, b, t.cols, d, c, t.cols);
#else
  gemm_nt(t.rows, t.cols, d, a, d, b, d, c, t.cols);
#endif
}

// Where a forward writes winners and a backward reads them (layout at the top of this file):
// the t2i section [bi][words] and the i2t section of direction both [rows][bt], null where
// the problem has none or no winners are kept.
template <class T>
struct WinnersAt {
  T* t2i = nullptr;
  T* i2t = nullptr;
};

template <class T>
WinnersAt<T> winners_at(const Problem& p, const Plan& plan, T* winners) {
  if (!winners) return {};
  if (p.direction == kT2I) return {winners, nullptr};
  return {winners, winners + p.bi * plan.t.rows};
}

// Stores image i's t2i winners for the tile's words (win: per word, its winning row within
// image i or kTied) in the t2i section; returns whether one of them is kTied.
bool store_t2i_winners(const Plan& plan, const Tile& t, int64_t i, const int32_t* win,
                       int32_t* t2i) {
  int32_t* dst = t2i + i * plan.t.rows + t.w0;
  int32_t low = 0;
#pragma omp simd reduction(min : low)
  for (int64_t w = 0; w < t.cols; ++w) {
    dst[w] = win[w];
    low = std::min(low, win[w]);
  }
  return low < 0;
}

// Writes image i's t2i scores against the tile's captions from q, its best score per word.
void write_t2i(const Problem& p, const Plan& plan, const Tile& t, int64_t i, const float* q,
               float* out) {
  for (int64_t j = t.j0; j < t.j1; ++j) {
    const int64_t n = p.text_lengths[j];
    const float s = max_pool::segment_sum(q + plan.t.off[j] - t.w0, n);
    out[i * plan.si + j * plan.sj] = p.mean ? s / static_cast<float>(n) : s;
  }
}

// A forward's winners: where they go (null sections: none kept) and per-thread scratch for
// one image's winners per word of a tile and column_winners' rows (cols entries each).
struct WinnersOut {
  WinnersAt<int32_t> at;
  int32_t* word;
  int32_t* row;
};

// Pools tile t of C into out[i, j] for its images and captions (q: cols floats, acc: caps),
// and writes its winners where kept; returns whether one of them is kTied.
bool pool_tile(const Problem& p, const Plan& plan, const Tile& t, const float* c, float* q,
               float* acc, const WinnersOut& win, float* out) {
  const bool t2i = p.direction != kI2T, i2t = p.direction != kT2I;
  bool tied = false;
  for (int64_t i = t.i0; i < t.i1; ++i) {
    const int64_t m = p.image_lengths[i];
    const float* ci = c + (plan.v.off[i] - t.r0) * t.cols;
    if (t2i && win.at.t2i) {
      max_pool::column_winners(ci, t.cols, m, t.cols, q, win.word, win.row);
      tied = store_t2i_winners(plan, t, i, win.word, win.at.t2i) || tied;
      write_t2i(p, plan, t, i, q, out);
    } else if (t2i) {
      max_pool::column_max(ci, t.cols, m, t.cols, q);
      write_t2i(p, plan, t, i, q, out);
    }
    if (i2t) {
      std::fill(acc, acc + (t.j1 - t.j0), 0.f);
      for (int64_t r = 0; r < m; ++r) {
        const float* cr = ci + r * t.cols;
        int32_t* wr = win.at.i2t ? win.at.i2t + (plan.v.off[i] + r) * p.bt : nullptr;
        for (int64_t j = t.j0; j < t.j1; ++j) {
          const float* seg = cr + plan.t.off[j] - t.w0;
          const float best = max_pool::segment_max(seg, p.text_lengths[j]);
          acc[j - t.j0] += best;
          if (!wr) continue;
          wr[j] = max_pool::sole_argmax(seg, p.text_lengths[j], best);
          tied = tied || wr[j] == max_pool::kTied;
        }
      }
      for (int64_t j = t.j0; j < t.j1; ++j) {
        const float s = p.mean ? acc[j - t.j0] / static_cast<float>(m) : acc[j - t.j0];
        float& o = out[i * plan.si + j * plan.sj];
        o = t2i ? o + s : s;
      }
    }
  }
  return tied;
}

bool block_is_zero(const Plan& plan, const Tile& t, const float* g) {
  for (int64_t i = t.i0; i < t.i1; ++i)
    for (int64_t j = t.j0; j < t.j1; ++j)
      if (g[i * plan.si + j * plan.sj] != 0.f) return false;
  return true;
}

// The similarities C of one tile, computed on first use (into a per-thread buffer).
class TileC {
 public:
  TileC(const Plan& plan, const Tile& t, int64_t d, float* buf)
      : plan_(plan), t_(t), d_(d), buf_(buf) {}
  const float* get() {
    if (!ready_) {
      ensure_packed(plan_, t_);
      similarities(plan_, t_, d_, buf_);
    }
    ready_ = true;
    return buf_;
  }

 private:
  const Plan& plan_;
  const Tile& t_;
  int64_t d_;
  float* buf_;
  bool ready_ = false;
};

// Whether tile t holds a query token marked kTied in the saved winners.
bool has_tie(const Problem& p, const Plan& plan, const Tile& t,
             const WinnersAt<const int32_t>& saved) {
  bool tie = false;
  for (int64_t i = t.i0; i < t.i1 && !tie; ++i) {
    const int32_t* src = saved.t2i + i * plan.t.rows + t.w0;
    for (int64_t w = 0; w < t.cols; ++w) tie = tie || src[w] == max_pool::kTied;
  }
  for (int64_t r = t.r0; saved.i2t && r < t.r0 + t.rows && !tie; ++r)
    for (int64_t j = t.j0; j < t.j1; ++j) tie = tie || saved.i2t[r * p.bt + j] == max_pool::kTied;
  return tie;
}

// Scatters the gradient of tile t into dv / dt, each query token's winners from the tile's
// similarities; with saved winners (tied), only the query tokens marked kTied there (the
// others were scattered from their saved winner). Loop orders keep the query token's rows in
// L1: t2i runs word by word over the tile's images (winners of all images first:
// best/idx/ties [images, cols]), i2t image token by image token over the captions. Exact ties
// share the gradient equally (torch's amax does the same).
struct Winners {
  float* best;
  int32_t* idx;
  int32_t* ties;
  float* coef;
  float** dv;  // per image of a tile: one word's winner rows and coefficients
  const float** v;
  float* a;
};

void backward_tile(const Problem& p, const Plan& plan, const Tile& t, TileC& tile,
                   const WinnersAt<const int32_t>& tied, const float* g, const Winners& win,
                   const RowDest& dv, const RowDest& dt) {
  const int64_t d = p.d;
  float* coef = win.coef;
  const float* c = tile.get();
  if (p.direction != kI2T) {
    for (int64_t i = t.i0; i < t.i1; ++i) {
      const int64_t o = (i - t.i0) * t.cols;
      const float* ci = c + (plan.v.off[i] - t.r0) * t.cols;
      max_pool::column_argmax(ci, t.cols, p.image_lengths[i], t.cols, win.best + o,
                              win.idx + o, win.ties + o);
    }
    for (int64_t j = t.j0; j < t.j1; ++j) {
      const int64_t n = p.text_lengths[j];
      bool any = false;
      for (int64_t i = t.i0; i < t.i1; ++i) {
        coef[i - t.i0] = g[i * plan.si + j * plan.sj] / (p.mean ? static_cast<float>(n) : 1.f);
        any = any || coef[i - t.i0] != 0.f;
      }
      if (!any) continue;
      for (int64_t w = plan.t.off[j]; w < plan.t.off[j] + n; ++w) {
        const float* tw = plan.t_rows.row(w);
        float* dtw = dt.row(w);
        int64_t pairs = 0;
        for (int64_t i = t.i0; i < t.i1; ++i) {
          const float a = coef[i - t.i0];
          if (a == 0.f) continue;
          if (tied.t2i && tied.t2i[i * plan.t.rows + w] != max_pool::kTied) continue;
          const int64_t o = (i - t.i0) * t.cols + w - t.w0, vr0 = plan.v.off[i];
          if (win.ties[o] == 1) {
            const int64_t r = vr0 + win.idx[o];
            win.dv[pairs] = dv.row(r);
            win.v[pairs] = plan.v_rows.row(r);
            win.a[pairs++] = a;
            continue;
          }
          const float share = a / static_cast<float>(win.ties[o]);
          for (int64_t r = vr0; r < vr0 + p.image_lengths[i]; ++r) {
            if (c[(r - t.r0) * t.cols + w - t.w0] != win.best[o]) continue;
            max_pool::axpy2(dv.row(r), tw, dtw, plan.v_rows.row(r), share, d);
          }
        }
        max_pool::scatter_word(dtw, tw, pairs, win.dv, win.v, win.a, d);
      }
    }
  }
  if (p.direction != kT2I) {
    for (int64_t i = t.i0; i < t.i1; ++i) {
      const int64_t m = p.image_lengths[i], vr0 = plan.v.off[i];
      const float scale = p.mean ? 1.f / static_cast<float>(m) : 1.f;
      bool any = false;
      for (int64_t j = t.j0; j < t.j1; ++j) {
        coef[j - t.j0] = g[i * plan.si + j * plan.sj] * scale;
        any = any || coef[j - t.j0] != 0.f;
      }
      if (!any) continue;
      for (int64_t r = vr0; r < vr0 + m; ++r) {
        const float* vr = plan.v_rows.row(r);
        float* dvr = dv.row(r);
        for (int64_t j = t.j0; j < t.j1; ++j) {
          const float a = coef[j - t.j0];
          if (a == 0.f) continue;
          if (tied.i2t && tied.i2t[r * p.bt + j] != max_pool::kTied) continue;
          const int64_t tw0 = plan.t.off[j], n = p.text_lengths[j];
          const float* seg = c + (r - t.r0) * t.cols + tw0 - t.w0;
          int64_t ties = 1;
          const int64_t k = max_pool::segment_argmax(seg, n, ties);
          const float share = a / static_cast<float>(ties);
          for (int64_t l = k; l < n; ++l) {
            if (l != k && seg[l] != seg[k]) continue;
            max_pool::axpy2(dvr, plan.t_rows.row(tw0 + l), dt.row(tw0 + l), vr, share, d);
            if (ties == 1) break;
          }
        }
      }
    }
  }
}

void check(const Problem& p) {
  max_tiles::check_lengths(p.image_lengths, p.bi, p.m_max, "image_lengths");
  max_tiles::check_lengths(p.text_lengths, p.bt, p.n_max, "text_lengths");
}

// i2t of (images, texts) is t2i of (texts, images), transposed. Running it that way turns
// its max along each caption's words into the vector max down rows (no horizontal segments).
Problem as_t2i(const Problem& p) {
  return Problem{p.texts, p.images, p.text_lengths, p.image_lengths, p.bt, p.n_max,
                 p.bi,    p.m_max,  p.d,            kT2I,            p.mean, p.screen,
                 p.amx};
}

#if HATK_CPU_AVX512
// Leading dimension of a screened tile's int32 similarities: AMX stores whole 32 x 32 blocks.
int64_t screen_ldc(const Problem& p, int64_t cols) {
  return p.amx ? (cols + max_amx::kBlock - 1) / max_amx::kBlock * max_amx::kBlock : cols;
}

// Rows [begin, end) of tile t's int32 similarities from the int8 codes into c (row begin, leading
// dimension screen_ldc); begin is a multiple of max_gemm::kMR (the panels' row blocks start at
// the tile's first row).
void screen_gemm(const Problem& p, const Plan& plan, const Tile& t, int32_t* c, int64_t begin,
                 int64_t end) {
  const int64_t d4 = plan.qv.d4;
  const int32_t* b8 = plan.b8.data() + plan.b_start[t.b] / p.d * d4;
  const int64_t ldc = screen_ldc(p, t.cols);
  if (p.amx)
    max_amx::gemm(plan.qv.row(t.r0 + begin), end - begin, b8, t.cols, d4, c, ldc);
  else
    max_gemm::panel_gemm<max_gemm::I8>(plan.a8.data() + (t.r0 + begin) * d4, end - begin, b8,
                                       t.cols, d4, c, ldc);
}

// Rows of a screened tile: AMX computes a whole tile's int8 GEMM at once (max_align_amx.h), so
// its tiles keep the float32 kernel's size.
int64_t screen_tile_rows(const Problem& p) { return p.amx ? kTileRows : kScreenTileRows; }

// Per-thread buffers of a screened pass over tiles (and its AMX configuration).
max_screen::Scratch screen_scratch(const Problem& p, const Plan& plan) {
  max_screen::Scratch s;
  // Without AMX, s.c holds a group's rows widened to whole row blocks at both ends
  // (for_screened_groups): at most 2 (kMR - 1) rows more than the group, and never more than
  // the tile.
  const int64_t rows =
      p.amx ? plan.max_rows + max_amx::kBlock
            : std::min(plan.max_rows, kScreenGroup * p.m_max + 2 * max_gemm::kMR);
  s.c.resize(rows * screen_ldc(p, plan.max_cols));
  s.win.resize(plan.max_cols);
  s.thr.resize(plan.max_cols);
  s.first.resize(kScreenGroup * plan.max_cols);
  s.best.resize(kScreenGroup * plan.max_cols);
  s.cand.resize((std::min(plan.max_rows, p.m_max) + 1) * 16);
  if (p.amx) max_amx::configure();
  return s;
}

// Calls f(ims, n, i0) for tile t's images in groups of at most kScreenGroup (ims: the n images
// from image i0, their int32 similarities computed) while f returns true; returns whether every
// call did. Without AMX the int8 GEMM runs group by group, just before the group is screened
// (whole row blocks: the block a group shares with the one before is moved to the front of s.c,
// not recomputed), so s.c holds one group; AMX computes the whole tile first.
template <class F>
bool for_screened_groups(const Problem& p, const Plan& plan, const Tile& t,
                         max_screen::Scratch& s, F&& f) {
  constexpr int64_t kMR = max_gemm::kMR;
  const int64_t ldc = screen_ldc(p, t.cols);
  int64_t base = 0, done = 0;  // s.c holds the tile's rows [base, done)
  if (p.amx) {
    screen_gemm(p, plan, t, s.c.data(), 0, t.rows);
    done = t.rows;
  }
  max_screen::Image ims[kScreenGroup];
  for (int64_t i0 = t.i0; i0 < t.i1; i0 += kScreenGroup) {
    const int64_t n = std::min(kScreenGroup, t.i1 - i0);
    if (!p.amx) {
      const int64_t lo = (plan.v.off[i0] - t.r0) / kMR * kMR;
      const int64_t hi = std::min(t.rows, (plan.v.off[i0 + n] - t.r0 + kMR - 1) / kMR * kMR);
      // s.c holds them (screen_scratch's size: a hard stop, not a silent overflow).
      if ((hi - lo) * ldc > static_cast<int64_t>(s.c.size())) std::abort();
      // The group's rows start in a block the previous group computed (done >= lo).
      std::memmove(s.c.data(), s.c.data() + (lo - base) * ldc, (done - lo) * ldc * sizeof(int32_t));
      base = lo;
      if (hi > done) {
        screen_gemm(p, plan, t, s.c.data() + (done - base) * ldc, done, hi);
        done = hi;
      }
    }
    for (int64_t k = 0; k < n; ++k) {
      const int64_t r0 = plan.v.off[i0 + k];
      ims[k] = {s.c.data() + (r0 - t.r0 - base) * ldc, p.image_lengths[i0 + k], ldc, r0};
    }
    if (!f(ims, n, i0)) return false;
  }
  return true;
}

// The t2i forward of tile t by screening (max_align_screen.h); false when the tile needs the
// float32 kernel (too many candidates). Writes the winners where kept (at.t2i) and sets tied
// when one of them is kTied (a NaN maximum counts as tied, as in max_pool::column_winners).
bool screened_tile(const Problem& p, const Plan& plan, const Tile& t, max_screen::Scratch& s,
                   const WinnersAt<int32_t>& at, float* out, bool& tied) {
  const int64_t limit = t.rows * t.cols / max_screen::kMaxCandidateShare;
  int64_t extra = 0;
  bool tile_tied = false;
  const bool kept = for_screened_groups(p, plan, t, s, [&](const max_screen::Image* ims,
                                                          int64_t n, int64_t i0) {
    max_screen::best_rows(ims, n, t.cols, t.w0, plan.v_rows, plan.t_rows, s.thr.data(),
                          s.first.data(), s.best.data());
    for (int64_t k = 0; k < n; ++k) {
      float* q = s.best.data() + k * t.cols;
      extra += max_screen::screen_image(ims[k], t.cols, t.w0, plan.qv, plan.qt, plan.v_rows,
                                        plan.t_rows, q, s.win.data(), s.thr.data(),
                                        s.first.data() + k * t.cols, s.cand.data());
      if (extra > limit) return false;
      if (at.t2i) {
        for (int64_t w = 0; w < t.cols; ++w)
          if (q[w] != q[w]) s.win[w] = max_pool::kTied;
        tile_tied = store_t2i_winners(plan, t, i0 + k, s.win.data(), at.t2i) || tile_tied;
      }
      write_t2i(p, plan, t, i0 + k, q, out);
    }
    return true;
  });
  tied = tied || (kept && tile_tied);
  return kept;
}

#endif

// The forward's per-thread float32 buffers and winners' scratch.
struct FloatScratch {
  std::unique_ptr<float[]> c, q, acc;
  std::vector<int32_t> word, row;
  WinnersOut win;
  FloatScratch(const Plan& plan, const WinnersAt<int32_t>& at)
      : c(max_tiles::scratch(plan.max_rows * plan.max_cols)),
        q(max_tiles::scratch(plan.max_cols)),
        acc(max_tiles::scratch(plan.max_caps)),
        word(at.t2i ? plan.max_cols : 0),
        row(word.size()),
        win{at, word.data(), row.data()} {}
  // Writes tile t's scores (and winners) with the float32 kernel; returns whether one of its
  // winners is kTied.
  bool tile(const Problem& p, const Plan& plan, const Tile& t, float* out) {
    ensure_packed(plan, t);
    similarities(plan, t, p.d, c.get());
    return pool_tile(p, plan, t, c.get(), q.get(), acc.get(), win, out);
  }
};

#if HATK_CPU_AVX512
// Which tiles of a call are screened: kProbeTiles tiles spread over the call are screened
// first; when more than one in kGiveUpShare of them falls back (data that defeats screening),
// the call gives up screening (screened_forward returns false) and runs as the float32 kernel,
// so such data costs little more than float32. The choice depends only on the inputs (not on
// the thread count or the scheduling), so results stay bit-identical from run to run.
constexpr int64_t kProbeTiles = 8, kGiveUpShare = 8;

// The t2i forward by screening, tile by tile (a tile with too many candidates runs the float32
// kernel); false, with nothing kept, when the probe tiles give up.
bool screened_forward(const Problem& p, bool transposed, float* out, int32_t* winners) {
  const Plan plan =
      make_plan(p, screen_tile_rows(p), kTileCols, transposed, Pack::kLazy, true);
  const WinnersAt<int32_t> at = winners_at(p, plan, winners);
  const int64_t n_ig = static_cast<int64_t>(plan.ig.size()) - 1;
  const int64_t n_cg = static_cast<int64_t>(plan.cg.size()) - 1;
  // Probe j is tile j * n_tiles / n_probe; probed[k]: 1 when tile k was screened by the probe,
  // 2 when it fell back.
  const int64_t n_tiles = n_ig * n_cg;
  const int64_t n_probe = std::min(kProbeTiles, n_tiles);
  std::vector<char> probed(n_tiles, 0);
  bool tied = false, keep = true;
#pragma omp parallel reduction(|| : tied)
  {
    const SingleThreadedBlas one_blas_thread;
    max_screen::Scratch s = screen_scratch(p, plan);
#pragma omp for schedule(dynamic, 1)
    for (int64_t j = 0; j < n_probe; ++j) {
      const int64_t k = j * n_tiles / n_probe;
      probed[k] = screened_tile(p, plan, tile_of(plan, k / n_cg, k % n_cg), s, at, out, tied)
                      ? 1 : 2;
    }
    // Implicit barrier: every probe is done.
    int64_t fell = 0;
    for (int64_t j = 0; j < n_probe; ++j) fell += probed[j * n_tiles / n_probe] == 2;
    if (fell * kGiveUpShare <= n_probe) {
      std::optional<FloatScratch> f;
#pragma omp for schedule(dynamic, 1)
      for (int64_t k = 0; k < n_tiles; ++k) {
        const Tile t = tile_of(plan, k / n_cg, k % n_cg);
        if (probed[k] == 1 || (!probed[k] && screened_tile(p, plan, t, s, at, out, tied)))
          continue;
        if (!f) f.emplace(plan, at);
        tied = f->tile(p, plan, t, out) || tied;
      }
    } else {
#pragma omp single
      keep = false;
    }
    if (p.amx) max_amx::release();
  }
  if (keep && winners) winners[max_align_winners_size(p) - 1] = tied ? 1 : 0;
  return keep;
}
#endif

void forward(const Problem& p, bool transposed, float* out, int32_t* winners) {
#if HATK_CPU_AVX512
  if (p.screen && p.direction == kT2I && p.d >= max_screen::kMinDim &&
      screened_forward(p, transposed, out, winners))
    return;
#endif
  const Plan plan = make_plan(p, kTileRows, kTileCols, transposed, Pack::kNow);
  const WinnersAt<int32_t> at = winners_at(p, plan, winners);
  bool tied = false;
  const int64_t n_ig = static_cast<int64_t>(plan.ig.size()) - 1;
  const int64_t n_cg = static_cast<int64_t>(plan.cg.size()) - 1;
#pragma omp parallel reduction(|| : tied)
  {
    const SingleThreadedBlas one_blas_thread;
    FloatScratch f(plan, at);
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < n_ig * n_cg; ++k)
      tied = f.tile(p, plan, tile_of(plan, k / n_cg, k % n_cg), out) || tied;
  }
  if (winners) winners[max_align_winners_size(p) - 1] = tied ? 1 : 0;
}

#if HATK_CPU_AVX512
// Writes image i's score bounds against the tile's captions from lo and hi, the bounds of its
// words' maxima (see bounds below).
void write_t2i_bounds(const Problem& p, const Plan& plan, const Tile& t, int64_t i,
                      const double* lo, const double* hi, double* lower, double* upper) {
  const double u = std::ldexp(1.0, -24);
  for (int64_t j = t.j0; j < t.j1; ++j) {
    const int64_t n = p.text_lengths[j], w0 = plan.t.off[j] - t.w0;
    double a = 0, b = 0, mag = 0;
    for (int64_t w = w0; w < w0 + n; ++w) {
      a += lo[w];
      b += hi[w];
      mag += std::max(std::fabs(lo[w]), std::fabs(hi[w]));
    }
    const double gamma = n * u / (1 - n * u);
    const double sum_margin = (gamma * mag + 1e-30) * (1 + 1e-12) + 1e-12 * mag;
    a -= sum_margin;
    b += sum_margin;
    if (p.mean) {
      a = a / n - (std::fabs(a) / n) * 2 * u;
      b = b / n + (std::fabs(b) / n) * 2 * u;
    }
    lower[i * plan.si + j * plan.sj] = a;
    upper[i * plan.si + j * plan.sj] = b;
  }
}

// Bounds of the t2i scores [bi, bt] (at i * si + j * sj) that any float32 kernel computes for
// these inputs, from the int8 similarities alone (max_screen::bound_image per image and word).
// A caption's float32 score is a float32 sum of its words' maxima (error at most
// gamma_n sum |f_w|, gamma_n = n u / (1 - n u)), then for mean one division (relative u):
// both are added to the interval, rounded outward.
void bounds(const Problem& p, bool transposed, double* lower, double* upper) {
  const Plan plan = make_plan(p, screen_tile_rows(p), kTileCols, transposed, Pack::kNone, true);
  const int64_t n_ig = static_cast<int64_t>(plan.ig.size()) - 1;
  const int64_t n_cg = static_cast<int64_t>(plan.cg.size()) - 1;
#pragma omp parallel
  {
    max_screen::Scratch s = screen_scratch(p, plan);
    std::vector<double> lo(plan.max_cols), hi(plan.max_cols);
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < n_ig * n_cg; ++k) {
      const Tile t = tile_of(plan, k / n_cg, k % n_cg);
      for_screened_groups(p, plan, t, s, [&](const max_screen::Image* ims, int64_t count,
                                             int64_t i0) {
        for (int64_t g = 0; g < count; ++g) {
          const int64_t i = i0 + g;
          max_screen::bound_image(ims[g], t.cols, t.w0, plan.qv, plan.qt, s.thr.data(),
                                  s.first.data(), lo.data(), hi.data());
          write_t2i_bounds(p, plan, t, i, lo.data(), hi.data(), lower, upper);
        }
        return true;
      });
    }
    if (p.amx) max_amx::release();
  }
}
#endif

// The backward from saved winners, their tied entries left out (max_align_scatter.h): t2i's
// section has images as keys and words as queries, both's i2t section the reverse.
void scatter_winners(const Problem& p, const Plan& plan, const WinnersAt<const int32_t>& saved,
                     const float* g, float* grad_images, float* grad_texts) {
  const int64_t d = p.d;
  const max_scatter::Side images{&plan.v_rows, &plan.v,
                                 {grad_images, &plan.v, p.m_max, d, 0, true}};
  const max_scatter::Side texts{&plan.t_rows, &plan.t, {grad_texts, &plan.t, p.n_max, d, 0, true}};
  max_scatter::backward({images, texts, saved.t2i, plan.t.rows, 1, g, plan.si, plan.sj, p.mean,
                         false}, d);
  if (p.direction == kBoth)
    max_scatter::backward({texts, images, saved.i2t, 1, p.bt, g, plan.sj, plan.si, p.mean, true},
                          d);
}

void backward(const Problem& p, bool transposed, const float* grad_out, float* grad_images,
              float* grad_texts, const int32_t* winners) {
  // With saved winners: the scatter from them, then the tiles holding a tied query token
  // (packed lazily, only those). Without: every tile. The tiles are the forward's (the same
  // GEMM on the same operands gives the same C, so tied query tokens find the same ties).
  static_assert(kBackwardRows == kTileRows && kBackwardCols == kTileCols);
  const bool tied = winners && winners[max_align_winners_size(p) - 1] != 0;
  const Plan plan = make_plan(p, kBackwardRows, kBackwardCols, transposed,
                              winners ? (tied ? Pack::kLazy : Pack::kNone) : Pack::kNow);
  const WinnersAt<const int32_t> saved = winners_at(p, plan, winners);
  const int64_t d = p.d;
  if (winners) {
    scatter_winners(p, plan, saved, grad_out, grad_images, grad_texts);
    if (!tied) return;
  } else {
    std::fill(grad_images, grad_images + p.bi * p.m_max * d, 0.f);
    std::fill(grad_texts, grad_texts + p.bt * p.n_max * d, 0.f);
  }
  const int64_t n_ig = static_cast<int64_t>(plan.ig.size()) - 1;
  const int64_t n_cg = static_cast<int64_t>(plan.cg.size()) - 1;
  // The parallel side owns its gradient rows; the outer side goes through partials, which
  // stay in L2. The side whose rows receive the scattered (winner) updates should be the
  // outer one: images for t2i and both, captions for i2t; unless that leaves too few tiles
  // to share among the threads.
  const int64_t enough = 4 * static_cast<int64_t>(omp_get_max_threads());
  bool images_parallel = p.direction != kI2T;
  if ((images_parallel ? n_ig : n_cg) < enough && (images_parallel ? n_cg : n_ig) >= enough)
    images_parallel = !images_parallel;
  const int64_t n_outer = images_parallel ? n_cg : n_ig;
  const int64_t n_inner = images_parallel ? n_ig : n_cg;
  const Packed& outer_packed = images_parallel ? plan.t : plan.v;
  const std::vector<int64_t>& outer_groups = images_parallel ? plan.cg : plan.ig;
  float* outer_grad = images_parallel ? grad_texts : grad_images;
  const int64_t outer_len = images_parallel ? p.n_max : p.m_max;
  // Chunks: runs of consecutive parallel-side groups, each with its own partial of the outer
  // side's rows; a chunk's groups run in order on one thread, and the partials are summed in
  // chunk order, so the result does not depend on which thread ran which chunk. Two chunks
  // per thread let a faster thread take more of them. Chunk 0 adds straight into the zeroed
  // gradient: the same sums as a partial added to zero, one partial fewer.
  const int64_t n_chunks =
      std::min<int64_t>(n_inner, kChunksPerThread * static_cast<int64_t>(omp_get_max_threads()));
  // Steps: runs of outer groups whose chunk partials fit kPartialBudget together (usually
  // one step: no barrier until the end, robust when threads get preempted).
  const int64_t span_rows = std::max<int64_t>(
      1, kPartialBudget / (static_cast<int64_t>(sizeof(float)) * d * n_chunks));
  std::vector<int64_t> steps{0};
  for (int64_t o = 0; o < n_outer;) {
    int64_t e = o + 1;
    while (e < n_outer &&
           outer_packed.off[outer_groups[e + 1]] - outer_packed.off[outer_groups[o]] <= span_rows)
      ++e;
    steps.push_back(e);
    o = e;
  }
  int64_t partial_rows = 0;
  for (size_t s = 0; s + 1 < steps.size(); ++s)
    partial_rows = std::max(partial_rows, outer_packed.off[outer_groups[steps[s + 1]]] -
                                              outer_packed.off[outer_groups[steps[s]]]);
  // Partial of chunk ch >= 1 at (ch - 1) * partial_rows rows.
  max_gemm::AlignedFloats partials =
      max_gemm::aligned_floats((n_chunks - 1) * partial_rows * d);
#pragma omp parallel
  {
    const SingleThreadedBlas one_blas_thread;
    auto c = max_tiles::scratch(plan.max_rows * plan.max_cols);
    const int64_t per_tile = std::max<int64_t>(plan.max_imgs * plan.max_cols, 1);
    auto best = max_tiles::scratch(per_tile);
    std::vector<int32_t> idx(per_tile), ties(per_tile);
    auto coef = max_tiles::scratch(std::max(plan.max_imgs, plan.max_caps));
    std::vector<float*> win_dv(std::max<int64_t>(plan.max_imgs, 1));
    std::vector<const float*> win_v(win_dv.size());
    auto win_a = max_tiles::scratch(plan.max_imgs);
    const Winners win{best.get(), idx.data(), ties.data(), coef.get(),
                      win_dv.data(), win_v.data(), win_a.get()};
    const RowDest dv_direct{grad_images, &plan.v, p.m_max, d, 0, true};
    const RowDest dt_direct{grad_texts, &plan.t, p.n_max, d, 0, true};
    for (size_t s = 0; s + 1 < steps.size(); ++s) {
      const int64_t first = outer_packed.off[outer_groups[steps[s]]];
      const int64_t count = outer_packed.off[outer_groups[steps[s + 1]]] - first;
      // A chunk's groups of the parallel side, each across the step's outer groups in order.
#pragma omp for schedule(dynamic, 1)
      for (int64_t ch = 0; ch < n_chunks; ++ch) {
        float* partial = ch ? partials.get() + (ch - 1) * partial_rows * d : outer_grad;
        if (ch) std::fill(partial, partial + count * d, 0.f);
        const RowDest to_partial{partial, &outer_packed, outer_len, d, first, ch == 0};
        for (int64_t k = ch * n_inner / n_chunks; k < (ch + 1) * n_inner / n_chunks; ++k) {
          for (int64_t o = steps[s]; o < steps[s + 1]; ++o) {
            const Tile t = images_parallel ? tile_of(plan, k, o) : tile_of(plan, o, k);
            if (block_is_zero(plan, t, grad_out)) continue;
            if (winners && !has_tie(p, plan, t, saved)) continue;
            TileC tile(plan, t, d, c.get());
            backward_tile(p, plan, t, tile, saved, grad_out, win,
                          images_parallel ? dv_direct : to_partial,
                          images_parallel ? to_partial : dt_direct);
          }
        }
      }
      // Implicit barrier above: every partial of this step is complete.
#pragma omp for schedule(static)
      for (int64_t r = first; r < first + count; ++r) {
        float* dst = RowDest{outer_grad, &outer_packed, outer_len, d, 0, true}.row(r);
        for (int64_t ch = 1; ch < n_chunks; ++ch)
          max_pool::axpy(dst, 1.f, partials.get() + ((ch - 1) * partial_rows + r - first) * d, d);
      }
      // Implicit barrier: partials may be cleared for the next step.
    }
  }
}

}  // namespace

// Checks p and calls run(problem, swapped): an i2t problem runs as t2i with the sides swapped.
template <class Run>
void run_as_t2i(const Problem& p, Run run) {
  check(p);
  if (p.direction == kI2T)
    run(as_t2i(p), true);
  else
    run(p, false);
}

void max_align_forward(const Problem& p, float* out, int32_t* winners) {
  run_as_t2i(p, [&](const Problem& q, bool swapped) { forward(q, swapped, out, winners); });
}

#if HATK_CPU_AVX512
void max_align_bounds(const Problem& p, double* lower, double* upper) {
  run_as_t2i(p, [&](const Problem& q, bool swapped) { bounds(q, swapped, lower, upper); });
}
#endif

void max_align_backward(const Problem& p, const float* grad_out, float* grad_images,
                        float* grad_texts, const int32_t* winners) {
  run_as_t2i(p, [&](const Problem& q, bool swapped) {
    backward(q, swapped, grad_out, swapped ? grad_texts : grad_images,
             swapped ? grad_images : grad_texts, winners);
  });
}

}  // namespace hatkernels::cpu::HATK_CPU_LEVEL::max_kernel
