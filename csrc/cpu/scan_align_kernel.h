// Fused HAT scan pooling on CPU, forward and backward (one instruction-set level: isa.h).
//
// Algorithm. Each side's valid tokens are packed into [sum of lengths, Dp] rows (Dp = D
// rounded up to 16, zero-filled), with their norms; padding is never read. The attended
// side of each direction (captions for i2t, images for t2i) gets its Gram matrix
// G = X X^T once per item when that is cheaper than forming contexts (q padded <= Dp).
// OpenMP splits the output into tiles of whole images x whole captions; per tile one
// GEMM writes the similarity block of the tile's packed tokens into a reused per-thread
// buffer: at the AVX-512 level the max kernel's register-blocked 12 x 32 micro-kernel on
// operands packed once per call (max_align_gemm.h: one side's tokens in 12-row blocks, each
// block of the other side in 32-token strips), elsewhere MKL (single-threaded inside the
// region). The forward's tiles hold S^T [words, image tokens]. Every (image, caption) pair is
// then pooled while the block is hot, from an L1-sized copy of its [n, m] block, as it is or
// transposed 16 x 16 at a time (scan_align_pair.h): LeakyReLU, the normalisation across the
// other side, softmax, and the cosine q via the Gram identity <x_r, c_r> = sum alpha S,
// |c_r|^2 = alpha_r^T G alpha_r, so the attended context c is formed only where D is the
// smaller side. Each direction takes the layout that prefer_lanes estimates cheaper: the
// attending tokens as rows (pair_forward) or as vector lanes (pair_forward_lanes); on W1 that
// is lanes for i2t and, for t2i, rows except for long captions, so that one copy as it is
// serves both directions. Tiles hold whole items, so there is no merge.
//
// The backward recomputes a tile's similarities and attention (as FlashAttention does),
// forms dS pair by pair analytically (through q, the Gram term, softmax, the normalisation
// and the LeakyReLU) into a tile buffer and applies it with two GEMMs (dV = dS T,
// dT = dS^T V; at the AVX-512 level on the forward's micro-kernel with T and V packed once
// per call, elsewhere on MKL). The norm terms (a scale of each token) and the Gram terms
// (2 dG X per attended item) are summed over the tiles and applied once per item at the end.
// So it does three GEMMs of the forward's size where the forward does one. Deterministic: each
// tile computes its gradient rows and terms alone, and they are added to its image block's in
// caption-block order and to its caption block's in image-block order (turn counters),
// so the gradients are bit-identical from run to run and for any thread count. Gradients are
// zero on padding.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/max_align_gemm.h"
#include "cpu/scan_align_pair.h"

namespace hatkernels::cpu::HATK_CPU_LEVEL::scan_kernel {
namespace {

using scan::Attended;
using scan::I16;
using scan::kLanes;
using scan::load;
using scan::pad_lanes;
using scan::PairScratch;
using scan::store;
using scan::transpose16;
using scan::V16;

// Target rows (image tokens) and columns (words) of a tile's similarity block.
constexpr int64_t kTileRows = 256;
constexpr int64_t kTileWords = 512;

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

// A zero-filled, 64-byte aligned float array.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(int64_t n) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * 4 + 63) / 64 * 64;
    data_.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    if (!data_) throw std::bad_alloc();
    std::memset(data_.get(), 0, bytes);
  }
  float* get() const { return data_.get(); }

 private:
  std::unique_ptr<float, FreeDeleter> data_;
};

// One side's valid tokens, packed, with norms and (optionally) per-item Gram matrices.
struct Side {
  int64_t count = 0, total = 0, max_len = 0, d = 0, dp = 0;
  std::vector<int64_t> off, len;  // item k's tokens are rows [off[k], off[k] + len[k])
  std::vector<int64_t> gram_off;  // item k's Gram [len, pad(len)] at grams + gram_off[k], or -1
  int64_t gram_size = 0;          // floats of all Gram matrices
  Buffer tokens, norms, grams;    // [total, dp], [total], the Gram matrices
  bool half_grams = false;        // the forward's: halved where scan::kHalfGramFrom says

  // Whether item k's Gram matrix holds only its lower triangle, half the diagonal.
  bool halved(int64_t k) const {
    return half_grams && pad_lanes(len[k]) >= scan::kHalfGramFrom;
  }
  // What item k's attention needs for |c|^2: its Gram matrix, else its tokens.
  Attended attended(int64_t k) const {
    const int64_t qp = pad_lanes(len[k]);
    if (gram_off[k] >= 0) return {grams.get() + gram_off[k], qp, qp, true, halved(k)};
    return {tokens.get() + off[k] * dp, dp, dp, false};
  }
};

Side pack_side(const float* x, const int64_t* lengths, int64_t count, int64_t max_len,
               int64_t d, const char* name) {
  Side s;
  s.count = count;
  s.d = d;
  s.dp = pad_lanes(d);
  s.off.resize(count + 1);
  s.len.resize(count);
  s.off[0] = 0;
  for (int64_t k = 0; k < count; ++k) {
    if (lengths[k] < 1 || lengths[k] > max_len) {
      throw std::invalid_argument(std::string("scan_align: ") + name + " must be in [1, " +
                                  std::to_string(max_len) + "], got " +
                                  std::to_string(lengths[k]));
    }
    s.len[k] = lengths[k];
    s.off[k + 1] = s.off[k] + lengths[k];
    s.max_len = std::max(s.max_len, lengths[k]);
  }
  s.total = s.off[count];
  s.tokens = Buffer(s.total * s.dp);
  s.norms = Buffer(s.total);
  float* tok = s.tokens.get();
  float* nrm = s.norms.get();
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < count; ++k) {
    for (int64_t t = 0; t < s.len[k]; ++t) {
      const float* src = x + (k * max_len + t) * d;
      float* dst = tok + (s.off[k] + t) * s.dp;
      std::memcpy(dst, src, static_cast<size_t>(d) * 4);
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < d; ++c) acc += dst[c] * dst[c];
      nrm[s.off[k] + t] = std::sqrt(acc);
    }
  }
  return s;
}

// Gram matrices of the items for which they are cheaper than contexts (padded length <= Dp);
// half: the long items' only as their lower triangles, half the diagonal (Side::halved).
void add_grams(Side& s, bool half) {
  s.half_grams = half;
  s.gram_off.assign(s.count, -1);
  int64_t size = 0;
  for (int64_t k = 0; k < s.count; ++k) {
    const int64_t qp = pad_lanes(s.len[k]);
    if (qp <= s.dp) {
      s.gram_off[k] = size;
      size += s.len[k] * qp;
    }
  }
  s.gram_size = size;
  if (size == 0) return;
  s.grams = Buffer(size);
  float* g = s.grams.get();
  const float* tok = s.tokens.get();
#pragma omp parallel
  {
    const SingleThreadedBlas one_blas_thread;
#pragma omp for schedule(dynamic, 16)
    for (int64_t k = 0; k < s.count; ++k) {
      if (s.gram_off[k] < 0) continue;
      const float* xk = tok + s.off[k] * s.dp;
      const int64_t n = s.len[k];
      float* gk = g + s.gram_off[k];
      const int64_t ld = pad_lanes(n);
      gemm_nt(n, n, s.d, xk, s.dp, xk, s.dp, gk, ld);
      if (!s.halved(k)) continue;
      for (int64_t r = 0; r < n; ++r) {
        gk[r * ld + r] *= 0.5f;
        std::fill(gk + r * ld + r + 1, gk + r * ld + n, 0.f);
      }
    }
  }
}

// Consecutive items grouped so that each block holds about `target` tokens (at least one item).
std::vector<int64_t> make_blocks(const Side& s, int64_t target) {
  std::vector<int64_t> starts{0};
  int64_t tokens = 0;
  for (int64_t k = 0; k < s.count; ++k) {
    if (tokens > 0 && tokens + s.len[k] > target) {
      starts.push_back(k);
      tokens = 0;
    }
    tokens += s.len[k];
  }
  starts.push_back(s.count);
  return starts;
}

int64_t max_block_tokens(const Side& s, const std::vector<int64_t>& blocks) {
  int64_t most = 0;
  for (size_t b = 0; b + 1 < blocks.size(); ++b) {
    most = std::max(most, s.off[blocks[b + 1]] - s.off[blocks[b]]);
  }
  return most;
}

// Row r of a side's packed tokens, for the panel packing of max_align_gemm.h.
struct PackedRows {
  const float* base;
  int64_t ld, d;
  const float* row(int64_t r) const { return base + r * ld; }
};

// Everything one call shares: packed sides, blocks, tile counts.
struct Plan {
  const Problem& prob;
  bool backward;
  Side img, txt;
  std::vector<int64_t> img_blocks, txt_blocks;
  int64_t rows_max = 0, words_max = 0, n_img_blocks = 0, n_tiles = 0;
  bool t2i, i2t;
#if HATK_CPU_AVX512
  // The similarity GEMM's operands (max_align_gemm.h): the rows' side (captions when
  // transposed, else images) in 12-row blocks, each block of the other side in 32-token
  // strips (block b's at strip_start[b]).
  Buffer row_panel, col_strips;
  std::vector<int64_t> strip_start;
  // The backward's dS products' right operands, packed once per call: each block's tokens
  // K-major in strips of 32 of the D columns (max_gemm::pack_col_strips_kmajor), block b of a
  // side at its first token * pad32(D).
  Buffer img_kmajor, txt_kmajor;
  int64_t d32 = 0;
#endif

  // backward: full Gram matrices (the forward's are halved: scan::Attended), S tiles and the
  // workspaces' gradient buffers.
  Plan(const Problem& p, bool backward)
      : prob(p),
        backward(backward),
        img(pack_side(p.images, p.image_lengths, p.bi, p.m_max, p.d, "image_lengths")),
        txt(pack_side(p.texts, p.text_lengths, p.bt, p.n_max, p.d, "text_lengths")),
        t2i(p.direction != kI2T),
        i2t(p.direction != kT2I) {
    if (p.direction < kT2I || p.direction > kBoth) {
      throw std::invalid_argument("scan_align: direction code must be 0, 1 or 2");
    }
    img.gram_off.assign(img.count, -1);
    txt.gram_off.assign(txt.count, -1);
    if (t2i) add_grams(img, !backward);
    if (i2t) add_grams(txt, !backward);
    img_blocks = make_blocks(img, kTileRows);
    txt_blocks = make_blocks(txt, kTileWords);
    rows_max = max_block_tokens(img, img_blocks);
    words_max = max_block_tokens(txt, txt_blocks);
    n_img_blocks = static_cast<int64_t>(img_blocks.size()) - 1;
    n_tiles = n_img_blocks * (static_cast<int64_t>(txt_blocks.size()) - 1);
#if HATK_CPU_AVX512
    pack_panels();
    if (backward) pack_kmajor();
#endif
  }

  // The forward's tiles hold S^T [words, image tokens], the backward's S [image tokens, words].
  bool transposed() const { return !backward; }

#if HATK_CPU_AVX512
  void pack_panels() {
    const int64_t d = prob.d;
    const Side& rs = transposed() ? txt : img;
    const Side& cs = transposed() ? img : txt;
    const std::vector<int64_t>& rb = transposed() ? txt_blocks : img_blocks;
    const std::vector<int64_t>& cb = transposed() ? img_blocks : txt_blocks;
    const int64_t n_rb = static_cast<int64_t>(rb.size()) - 1;
    const int64_t n_cb = static_cast<int64_t>(cb.size()) - 1;
    strip_start.assign(n_cb + 1, 0);
    for (int64_t b = 0; b < n_cb; ++b) {
      const int64_t cols = cs.off[cb[b + 1]] - cs.off[cb[b]];
      const int64_t strips = (cols + max_gemm::kNR - 1) / max_gemm::kNR;
      strip_start[b + 1] = strip_start[b] + strips * max_gemm::kNR * d;
    }
    row_panel = Buffer(rs.total * d);
    col_strips = Buffer(strip_start[n_cb]);
    const PackedRows ri{rs.tokens.get(), rs.dp, d}, ci{cs.tokens.get(), cs.dp, d};
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t k = 0; k < n_rb + n_cb; ++k) {
      if (k < n_rb) {
        const int64_t r0 = rs.off[rb[k]];
        max_gemm::pack_row_blocks(ri, r0, rs.off[rb[k + 1]] - r0, row_panel.get());
      } else {
        const int64_t b = k - n_rb, w0 = cs.off[cb[b]];
        max_gemm::pack_col_strips(ci, w0, cs.off[cb[b + 1]] - w0,
                                  col_strips.get() + strip_start[b]);
      }
    }
  }

  void pack_kmajor() {
    d32 = (prob.d + max_gemm::kNR - 1) / max_gemm::kNR * max_gemm::kNR;
    img_kmajor = Buffer(img.total * d32);
    txt_kmajor = Buffer(txt.total * d32);
    const int64_t n_txt_blocks = static_cast<int64_t>(txt_blocks.size()) - 1;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t k = 0; k < n_img_blocks + n_txt_blocks; ++k) {
      const bool is_img = k < n_img_blocks;
      const Side& side = is_img ? img : txt;
      const std::vector<int64_t>& blocks = is_img ? img_blocks : txt_blocks;
      const int64_t b = is_img ? k : k - n_img_blocks, r0 = side.off[blocks[b]];
      max_gemm::pack_col_strips_kmajor(side.tokens.get() + r0 * side.dp, side.dp,
                                       side.off[blocks[b + 1]] - r0, prob.d,
                                       (is_img ? img_kmajor : txt_kmajor).get() + r0 * d32);
    }
  }
#endif
};

// Per-thread buffers: the tile's similarities, the pair scratch and (backward) gradients.
struct Workspace {
  int64_t qp_max, width_max;
  Buffer sim, local, local_t, alpha, y, work, col, row, lanes;
  Buffer dsim, dimg, dtxt, kimg, ktxt, dgram;
  Buffer blocks;  // the backward's packed dS (AVX-512: backward_gemms)

  explicit Workspace(const Plan& pl) {
    const int64_t p_max = std::max(pl.img.max_len, pl.txt.max_len);
    qp_max = pad_lanes(p_max);
    width_max = std::max(qp_max, pl.img.dp);
    sim = Buffer(pl.rows_max * pl.words_max + kLanes);
    local = Buffer(p_max * qp_max);
    if (!pl.backward) local_t = Buffer(p_max * qp_max);
    alpha = Buffer(pad_lanes(p_max) * qp_max);
    y = Buffer(p_max * width_max);
    work = Buffer(p_max * qp_max);
    col = Buffer(3 * qp_max);
    row = Buffer(5 * p_max);
    lanes = Buffer(pad_lanes(p_max) * kLanes);
    if (pl.backward) {
#if HATK_CPU_AVX512
      blocks = Buffer(pl.rows_max * pl.words_max);
#endif
      dsim = Buffer(pl.rows_max * pl.words_max + kLanes);
      dimg = Buffer(pl.rows_max * pl.img.dp);
      dtxt = Buffer(pl.words_max * pl.img.dp);
      kimg = Buffer(pl.rows_max);
      ktxt = Buffer(pl.words_max);
      dgram = Buffer((pl.rows_max + pl.words_max) * qp_max);
    }
  }
  PairScratch scratch() const {
    return {alpha.get(), y.get(), work.get(), col.get(), row.get(), lanes.get()};
  }
};

// One tile: image block ib, images [i0, i1) x caption block jb, captions [j0, j1); rows/cols
// offsets of the packed tokens.
struct Tile {
  int64_t ib, jb, i0, i1, j0, j1, r0, rows, w0, words;
};

Tile tile_of(const Plan& pl, int64_t t) {
  const int64_t ib = t % pl.n_img_blocks, jb = t / pl.n_img_blocks;
  Tile tile{ib, jb, pl.img_blocks[ib], pl.img_blocks[ib + 1], pl.txt_blocks[jb],
            pl.txt_blocks[jb + 1], 0, 0, 0, 0};
  tile.r0 = pl.img.off[tile.i0];
  tile.rows = pl.img.off[tile.i1] - tile.r0;
  tile.w0 = pl.txt.off[tile.j0];
  tile.words = pl.txt.off[tile.j1] - tile.w0;
  return tile;
}

// The tile's similarities S [rows, words] = V_tile T_tile^T, or S^T [words, rows] when the
// plan is transposed.
void tile_similarities(const Plan& pl, const Tile& tile, float* sim) {
  const int64_t d = pl.prob.d;
#if HATK_CPU_AVX512
  if (pl.transposed()) {
    max_gemm::panel_gemm(pl.row_panel.get() + tile.w0 * d, tile.words,
                         pl.col_strips.get() + pl.strip_start[tile.ib], tile.rows, d, sim,
                         tile.rows);
  } else {
    max_gemm::panel_gemm(pl.row_panel.get() + tile.r0 * d, tile.rows,
                         pl.col_strips.get() + pl.strip_start[tile.jb], tile.words, d, sim,
                         tile.words);
  }
#else
  const int64_t dp = pl.img.dp;
  const float* v = pl.img.tokens.get() + tile.r0 * dp;
  const float* t = pl.txt.tokens.get() + tile.w0 * dp;
  if (pl.transposed()) {
    gemm_nt(tile.words, tile.rows, d, t, dp, v, dp, sim, tile.rows);
  } else {
    gemm_nt(tile.rows, tile.words, d, v, dp, t, dp, sim, tile.words);
  }
#endif
}

// Copy a pair's block [m, n] of the tile's similarities into dst, padded to [m, pad(n)] (i2t)
// or transposed into [n, pad(m)] (t2i, in 16 x 16 blocks), zeros in the padding. The
// transposing copy loads whole vectors of 16 columns, so it may read up to 15 floats past the
// pair's columns (the tile buffers have kLanes floats of slack); they reach only the rows of
// dst that are not stored. The plain copy reads whole vectors too and zeroes the padding.
void load_block(const float* sim, int64_t ld, int64_t m, int64_t n, bool transpose, float* dst) {
  if (!transpose) {
    const int64_t np = pad_lanes(n), last = np - kLanes;
    const I16 tail = scan::lanes_below(n - last);
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t c = 0; c < last; c += kLanes) store(dst + r * np + c, load(sim + r * ld + c));
      store(dst + r * np + last, tail ? load(sim + r * ld + last) : V16{});
    }
  } else {
    const int64_t mp = pad_lanes(m);
    for (int64_t r0 = 0; r0 < mp; r0 += kLanes) {
      for (int64_t w0 = 0; w0 < n; w0 += kLanes) {
        V16 v[kLanes];
        for (int64_t i = 0; i < kLanes; ++i)
          v[i] = r0 + i < m ? load(sim + (r0 + i) * ld + w0) : V16{};
        transpose16(v);
        for (int64_t w = w0; w < std::min(n, w0 + kLanes); ++w)
          store(dst + w * mp + r0, v[w - w0]);
      }
    }
  }
}

// Write (add: add) a pair's dP into the tile's dS block (the inverse of load_block; the
// transposed one rewrites whole vectors of 16 columns, only the pair's own ones changed).
void store_block(const float* src, int64_t m, int64_t n, bool transpose, bool add, float* dsim,
                 int64_t ld) {
  if (!transpose) {
    const int64_t np = pad_lanes(n);
    for (int64_t r = 0; r < m; ++r) {
      float* out = dsim + r * ld;
      const float* in = src + r * np;
#pragma omp simd
      for (int64_t w = 0; w < n; ++w) out[w] = add ? out[w] + in[w] : in[w];
    }
  } else {
    const int64_t mp = pad_lanes(m);
    for (int64_t w0 = 0; w0 < n; w0 += kLanes) {
      const I16 mine = scan::lanes_below(n - w0);
      for (int64_t r0 = 0; r0 < m; r0 += kLanes) {
        V16 v[kLanes];
        for (int64_t i = 0; i < kLanes; ++i)
          v[i] = w0 + i < n ? load(src + (w0 + i) * mp + r0) : V16{};
        transpose16(v);
        for (int64_t r = r0; r < std::min(m, r0 + kLanes); ++r) {
          float* out = dsim + r * ld + w0;
          const V16 old = load(out);
          store(out, mine ? (add ? old + v[r - r0] : v[r - r0]) : old);
        }
      }
    }
  }
}

std::vector<Workspace> make_workspaces(const Plan& pl) {
  const int threads = std::max(1, std::min<int>(omp_get_max_threads(), pl.n_tiles));
  std::vector<Workspace> ws;
  ws.reserve(threads);
  for (int t = 0; t < threads; ++t) ws.emplace_back(pl);
  return ws;
}

#if HATK_CPU_AVX512
// dS [rows, words] (row-major) as the micro-kernel's row blocks (max_gemm::pack_row_blocks'
// layout: blocks of kMR rows, each [words][mr]), 16 words at a time through a 16 x 16
// transpose instead of one float at a time. Reads up to 15 floats past a row (the tile
// buffer's slack); they reach only transposed vectors that are not stored.
void pack_dsim_blocks(const float* dsim, int64_t rows, int64_t words, float* dst) {
  for (int64_t b0 = 0; b0 < rows; b0 += max_gemm::kMR) {
    const int64_t mr = std::min(max_gemm::kMR, rows - b0);
    const __mmask16 keep = static_cast<__mmask16>((1u << mr) - 1u);
    float* blk = dst + b0 * words;
    for (int64_t k0 = 0; k0 < words; k0 += kLanes) {
      V16 v[kLanes];
      for (int64_t i = 0; i < kLanes; ++i)
        v[i] = i < mr ? load(dsim + (b0 + i) * words + k0) : V16{};
      transpose16(v);
      for (int64_t kk = 0; kk < std::min(kLanes, words - k0); ++kk)
        _mm512_mask_storeu_ps(blk + (k0 + kk) * mr, keep, v[kk]);
    }
  }
}
#endif

// dimg [rows, Dp] += dS T and dtxt [words, Dp] += dS^T V (the D columns) for a tile. At the
// AVX-512 level on the forward's register-blocked micro-kernel, packing dS and dS^T per tile
// (T and V were packed once per call: Plan::pack_kmajor) (MKL's sgemm_ ran these products at
// about a third of the FMA peak on an AMD EPYC); elsewhere on MKL.
void backward_gemms(const Plan& pl, const Tile& tile, const Workspace& w) {
  const int64_t d = pl.prob.d, dp = pl.img.dp;
#if HATK_CPU_AVX512
  float* blocks = w.blocks.get();
  pack_dsim_blocks(w.dsim.get(), tile.rows, tile.words, blocks);
  max_gemm::panel_gemm<max_gemm::F32, true>(blocks, tile.rows,
                                            pl.txt_kmajor.get() + tile.w0 * pl.d32, d,
                                            tile.words, w.dimg.get(), dp);
  max_gemm::pack_row_blocks_kmajor(w.dsim.get(), tile.words, tile.rows, tile.words, blocks);
  max_gemm::panel_gemm<max_gemm::F32, true>(blocks, tile.words,
                                            pl.img_kmajor.get() + tile.r0 * pl.d32, d,
                                            tile.rows, w.dtxt.get(), dp);
#else
  const float* vt = pl.img.tokens.get() + tile.r0 * dp;
  const float* tt = pl.txt.tokens.get() + tile.w0 * dp;
  gemm_nn(tile.rows, d, tile.words, w.dsim.get(), tile.words, tt, dp, w.dimg.get(), dp, 1.f,
          1.f);
  gemm_tn(tile.words, d, tile.rows, w.dsim.get(), tile.words, vt, dp, w.dtxt.get(), dp, 1.f,
          1.f);
#endif
}

// The workspace's dG of a tile's attended items, [len, pad(len)] each at its first token's row
// (stride qp_max): captions (i2t) from w.dgram, then images (t2i).
float* tile_dgram_img(const Plan& pl, const Tile& tile, const Workspace& w) {
  return w.dgram.get() + (pl.i2t ? tile.words * w.qp_max : 0);
}

// A tile's input gradients, in the workspace: dimg [rows, Dp] and dtxt [words, Dp].
void tile_gradients(const Plan& pl, const Tile& tile, float lam, const float* grad_out,
                    const Workspace& w, const PairScratch& scratch) {
  const Problem& p = pl.prob;
  const int64_t dp = pl.img.dp, qpm = w.qp_max;
  float* sim = w.sim.get();
  float* dsim = w.dsim.get();
  float* dimg = w.dimg.get();
  float* dtxt = w.dtxt.get();
  float* kimg = w.kimg.get();
  float* ktxt = w.ktxt.get();
  float* local = w.local.get();
  float* dgram_txt = w.dgram.get();
  float* dgram_img = tile_dgram_img(pl, tile, w);
  const int64_t dgram_rows = (pl.i2t ? tile.words : 0) + (pl.t2i ? tile.rows : 0);
  tile_similarities(pl, tile, sim);
  std::memset(dimg, 0, static_cast<size_t>(tile.rows * dp) * 4);
  std::memset(dtxt, 0, static_cast<size_t>(tile.words * dp) * 4);
  std::memset(kimg, 0, static_cast<size_t>(tile.rows) * 4);
  std::memset(ktxt, 0, static_cast<size_t>(tile.words) * 4);
  std::memset(dgram_txt, 0, static_cast<size_t>(dgram_rows * qpm) * 4);
  for (int64_t i = tile.i0; i < tile.i1; ++i) {
    const int64_t m = pl.img.len[i], ri = pl.img.off[i] - tile.r0;
    const Attended att_img = pl.img.attended(i);
    for (int64_t j = tile.j0; j < tile.j1; ++j) {
      const int64_t n = pl.txt.len[j], wj = pl.txt.off[j] - tile.w0;
      const float g = grad_out[i * p.bt + j];
      const float* block = sim + ri * tile.words + wj;
      float* dblock = dsim + ri * tile.words + wj;
      if (pl.i2t) {
        const Attended att = pl.txt.attended(j);
        float* dacc = att.gram ? dgram_txt + wj * qpm : dtxt + wj * dp;
        load_block(block, tile.words, m, n, false, local);
        scan::pair_backward(local, m, n, pad_lanes(n), pl.img.norms.get() + pl.img.off[i], att,
                            lam, p.mean ? g / static_cast<float>(m) : g, scratch, kimg + ri,
                            dacc, att.gram ? pad_lanes(n) : dp);
        store_block(local, m, n, false, false, dblock, tile.words);
      }
      if (pl.t2i) {
        float* dacc = att_img.gram ? dgram_img + ri * qpm : dimg + ri * dp;
        load_block(block, tile.words, m, n, true, local);
        scan::pair_backward(local, n, m, pad_lanes(m), pl.txt.norms.get() + pl.txt.off[j],
                            att_img, lam, p.mean ? g / static_cast<float>(n) : g, scratch,
                            ktxt + wj, dacc, att_img.gram ? pad_lanes(m) : dp);
        store_block(local, m, n, true, pl.i2t, dblock, tile.words);
      }
    }
  }
  // dV += dS T, dT += dS^T V (onto the context mode's terms); the Gram and norm terms are
  // summed over the tiles and applied once (ItemTerms).
  backward_gemms(pl, tile, w);
}

// Add the packed gradient rows of items [k0, k1) (starting at item k0's first token) into
// the padded [count, max_len, d] gradient.
void add_rows(const Side& s, int64_t k0, int64_t k1, const float* rows, int64_t max_len,
              float* grad) {
  const int64_t d = s.d;
  for (int64_t k = k0; k < k1; ++k) {
    for (int64_t t = 0; t < s.len[k]; ++t) {
      const float* src = rows + (s.off[k] - s.off[k0] + t) * s.dp;
      float* dst = grad + (k * max_len + t) * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) dst[c] += src[c];
    }
  }
}

// What the tiles give each token and attended item besides their gradient rows, summed over
// the tiles in their turn order and applied once, after the last tile (so that they cost one
// pass per item, not one per tile): the norm terms k_r x_r, and the Gram terms 2 dG X of the
// items attended through their Gram matrices.
struct ItemTerms {
  std::vector<float> k;  // [total], or empty when the side attends in no direction
  Buffer dgram;          // the side's Gram layout (Side::gram_off)

  ItemTerms(const Side& s, bool attends) : k(attends ? s.total : 0, 0.f), dgram(s.gram_size) {}

  // Add a tile's terms for items [k0, k1): per token, then each Gram item's dG [len, pad(len)]
  // at tile_dgram + (its first token - the block's) * ld (dgram: nullptr when not attended).
  void add(const Side& s, int64_t k0, int64_t k1, const float* tile_k, const float* tile_dgram,
           int64_t ld) {
    const int64_t r0 = s.off[k0];
    for (int64_t r = r0; r < s.off[k1] && !k.empty(); ++r) k[r] += tile_k[r - r0];
    if (!tile_dgram) return;
    for (int64_t item = k0; item < k1; ++item) {
      if (s.gram_off[item] < 0) continue;
      const float* src = tile_dgram + (s.off[item] - r0) * ld;
      float* dst = dgram.get() + s.gram_off[item];
      const int64_t n = s.len[item] * pad_lanes(s.len[item]);
#pragma omp simd
      for (int64_t e = 0; e < n; ++e) dst[e] += src[e];
    }
  }

  // grad [count, max_len, d] += k_r x_r and 2 dG X, item by item.
  void apply(const Side& s, int64_t max_len, float* grad) const {
    const int64_t d = s.d, dp = s.dp;
#pragma omp parallel
    {
      const SingleThreadedBlas one_blas_thread;
#pragma omp for schedule(dynamic, 16)
      for (int64_t item = 0; item < s.count; ++item) {
        float* rows = grad + item * max_len * d;
        const float* x = s.tokens.get() + s.off[item] * dp;
        for (int64_t t = 0; t < s.len[item] && !k.empty(); ++t) {
          const float kt = k[s.off[item] + t];
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) rows[t * d + c] += kt * x[t * dp + c];
        }
        if (s.gram_off[item] < 0) continue;
        const int64_t n = s.len[item];
        gemm_nn(n, d, n, dgram.get() + s.gram_off[item], pad_lanes(n), x, dp, rows, d, 2.f, 1.f);
      }
    }
  }
};

// A block's turn counter: contributions to one block's gradient rows are added in a fixed
// order (turn 0, 1, ...), each after the previous one, whatever thread computed it.
class Turns {
 public:
  explicit Turns(int64_t blocks) : next_(blocks) {}
  void wait(int64_t block, int turn) {
    std::atomic<int>& next = next_[block];
    for (int now = next.load(std::memory_order_acquire); now != turn;
         now = next.load(std::memory_order_acquire))
      next.wait(now, std::memory_order_acquire);
  }
  void pass(int64_t block) {
    next_[block].fetch_add(1, std::memory_order_release);
    next_[block].notify_all();
  }

 private:
  std::vector<std::atomic<int>> next_;
};

// The tiles in anti-diagonal order (image block + caption block ascending): the tiles that
// precede a tile in its image block's and its caption block's addition order lie on the
// previous diagonal, so they were handed out earlier and are rarely still running.
std::vector<int64_t> diagonal_order(const Plan& pl) {
  const int64_t n_img = pl.n_img_blocks, n_txt = pl.n_tiles / pl.n_img_blocks;
  std::vector<int64_t> order;
  order.reserve(pl.n_tiles);
  for (int64_t s = 0; s + 1 < n_img + n_txt; ++s)
    for (int64_t ib = std::max<int64_t>(0, s - n_txt + 1); ib <= std::min(s, n_img - 1); ++ib)
      order.push_back((s - ib) * n_img + ib);
  return order;
}

}  // namespace

void scan_align_forward(const Problem& p, float lambda_softmax, float* out) {
  if (p.bi <= 0 || p.bt <= 0) return;
  const Plan pl(p, false);
  std::vector<Workspace> ws = make_workspaces(pl);
  const int threads = static_cast<int>(ws.size());
#pragma omp parallel num_threads(threads)
  {
    const SingleThreadedBlas one_blas_thread;
    const Workspace& w = ws[omp_get_thread_num()];
    const PairScratch scratch = w.scratch();
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < pl.n_tiles; ++t) {
      const Tile tile = tile_of(pl, t);
      tile_similarities(pl, tile, w.sim.get());
      for (int64_t i = tile.i0; i < tile.i1; ++i) {
        const int64_t m = pl.img.len[i];
        const float* vnorm = pl.img.norms.get() + pl.img.off[i];
        const Attended att_img = pl.img.attended(i);
        for (int64_t j = tile.j0; j < tile.j1; ++j) {
          const int64_t n = pl.txt.len[j];
          const float* tnorm = pl.txt.norms.get() + pl.txt.off[j];
          // The pair's block of S^T, [n, m]: copied as it is ([n, pad(m)]: t2i's rows, i2t's
          // lanes) or transposed ([m, pad(n)]: i2t's rows, t2i's lanes), each at most once.
          const float* block = w.sim.get() + (pl.txt.off[j] - tile.w0) * tile.rows +
                               (pl.img.off[i] - tile.r0);
          bool have_nm = false, have_mn = false;
          const auto nm = [&] {
            if (!have_nm) load_block(block, tile.rows, n, m, false, w.local.get());
            have_nm = true;
            return w.local.get();
          };
          const auto mn = [&] {
            if (!have_mn) load_block(block, tile.rows, n, m, true, w.local_t.get());
            have_mn = true;
            return w.local_t.get();
          };
          float score = 0.f;
          if (pl.i2t) {
            const Attended att = pl.txt.attended(j);
            const float s =
                att.gram && scan::prefer_lanes(m, n, att.half)
                    ? scan::pair_forward_lanes(nm(), m, n, vnorm, att, lambda_softmax, scratch)
                    : scan::pair_forward(mn(), m, n, pad_lanes(n), vnorm, att, lambda_softmax,
                                         scratch);
            score += p.mean ? s / static_cast<float>(m) : s;
          }
          if (pl.t2i) {
            const float s =
                att_img.gram && scan::prefer_lanes(n, m, att_img.half)
                    ? scan::pair_forward_lanes(mn(), n, m, tnorm, att_img, lambda_softmax,
                                               scratch)
                    : scan::pair_forward(nm(), n, m, pad_lanes(m), tnorm, att_img,
                                         lambda_softmax, scratch);
            score += p.mean ? s / static_cast<float>(n) : s;
          }
          out[i * p.bt + j] = score;
        }
      }
    }
  }
}

void scan_align_backward(const Problem& p, float lambda_softmax, const float* grad_out,
                         float* grad_images, float* grad_texts) {
  std::memset(grad_images, 0, static_cast<size_t>(p.bi * p.m_max * p.d) * 4);
  std::memset(grad_texts, 0, static_cast<size_t>(p.bt * p.n_max * p.d) * 4);
  if (p.bi <= 0 || p.bt <= 0) return;
  const Plan pl(p, true);
  std::vector<Workspace> ws = make_workspaces(pl);
  const int threads = static_cast<int>(ws.size());
  // Tiles are handed out in diagonal order by one counter (so every tile a tile waits for
  // was taken earlier, by a thread that is running it); an image block's rows receive their
  // tiles' contributions in caption-block order, a caption block's in image-block order.
  const std::vector<int64_t> order = diagonal_order(pl);
  std::atomic<int64_t> next_tile{0};
  Turns img_turns(pl.n_img_blocks), txt_turns(pl.n_tiles / pl.n_img_blocks);
  ItemTerms img_terms(pl.img, pl.i2t), txt_terms(pl.txt, pl.t2i);
#pragma omp parallel num_threads(threads)
  {
    const SingleThreadedBlas one_blas_thread;
    const Workspace& w = ws[omp_get_thread_num()];
    const PairScratch scratch = w.scratch();
    for (int64_t k = next_tile++; k < pl.n_tiles; k = next_tile++) {
      const Tile tile = tile_of(pl, order[k]);
      tile_gradients(pl, tile, lambda_softmax, grad_out, w, scratch);
      img_turns.wait(tile.ib, static_cast<int>(tile.jb));
      add_rows(pl.img, tile.i0, tile.i1, w.dimg.get(), p.m_max, grad_images);
      img_terms.add(pl.img, tile.i0, tile.i1, w.kimg.get(),
                    pl.t2i ? tile_dgram_img(pl, tile, w) : nullptr, w.qp_max);
      img_turns.pass(tile.ib);
      txt_turns.wait(tile.jb, static_cast<int>(tile.ib));
      add_rows(pl.txt, tile.j0, tile.j1, w.dtxt.get(), p.n_max, grad_texts);
      txt_terms.add(pl.txt, tile.j0, tile.j1, w.ktxt.get(), pl.i2t ? w.dgram.get() : nullptr,
                    w.qp_max);
      txt_turns.pass(tile.jb);
    }
  }
  img_terms.apply(pl.img, p.m_max, grad_images);
  txt_terms.apply(pl.txt, p.n_max, grad_texts);
}

}  // namespace hatkernels::cpu::HATK_CPU_LEVEL::scan_kernel
