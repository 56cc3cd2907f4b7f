// The int8 GEMM of a screened max tile (max_align_screen.h) on AMX tiles, where the CPU has
// AMX-INT8 and the operating system lets the process use it (isa.cpp asks once per process).
// One tdpbusd multiplies a 16 x 64 tile of unsigned image codes by a 64 x 16 tile of signed
// word codes into 16 x 16 int32 sums: 16,384 multiply-adds, against 64 for one AVX-512 VNNI
// vpdpbusd, so the GEMM that screening starts from becomes a small part of its cost. The sums
// are the same integers as the VNNI micro-kernel's (exact int32 arithmetic), so everything
// after the GEMM is unchanged.
//
// Operands, as the screened plan lays them out: image codes row-major (Codes::words, d4 words
// of 4 codes per row, d4 a multiple of 16 so that every K step is one full 64-byte tile row,
// padded past the last row); word codes in the strips of max_gemm::pack_col_strips
// ([d4][32] words per strip of 32 words), read as two 16-column tiles with a stride of 128
// bytes, which is the layout tdpbusd expects of its second operand (four consecutive codes of
// a column in one 32-bit word).
#pragma once
#include <cstdint>

#if HATK_CPU_AVX512
#define HATK_AMX __attribute__((target("amx-tile,amx-int8")))

namespace hatkernels::cpu::HATK_CPU_LEVEL::max_amx {

// Rows and columns of a block of four accumulator tiles (two A tiles x two B tiles).
constexpr int64_t kBlock = 32;
// Codes per row are padded to a multiple of this many 32-bit words (one 64-byte tile row).
constexpr int64_t kWordsPerStep = 16;

struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3 accumulate C, 4-5 hold image codes, 6-7 word codes; all 16 rows x 64 bytes.
// The configuration is per thread: every thread that runs amx_gemm calls this first.
HATK_AMX inline void configure() {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // GCC 12 does not see that ldtilecfg reads the whole struct and drops the stores above.
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

HATK_AMX inline void release() { _tile_release(); }

// C [rows, cols] (leading dimension ldc, a multiple of kBlock) += nothing: C is overwritten with
// the int32 sums of image rows [0, rows) of a (row-major, d4 words per row; readable up to
// rows rounded up to kBlock) against the words of the strips b (cols words, zero past them).
// C holds rows and columns rounded up to kBlock.
HATK_AMX inline void gemm(const int32_t* a, int64_t rows, const int32_t* b, int64_t cols,
                          int64_t d4, int32_t* c, int64_t ldc) {
  const int64_t lda = d4 * 4, ldb = 32 * 4, ldc_bytes = ldc * 4;
  for (int64_t s0 = 0; s0 < cols; s0 += kBlock) {
    const int32_t* strip = b + s0 * d4;
    for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
      const int32_t* a0 = a + r0 * d4;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < d4; k += kWordsPerStep) {
        _tile_loadd(4, a0 + k, lda);
        _tile_loadd(5, a0 + 16 * d4 + k, lda);
        _tile_loadd(6, strip + k * 32, ldb);
        _tile_loadd(7, strip + k * 32 + 16, ldb);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
      }
      int32_t* cb = c + r0 * ldc + s0;
      _tile_stored(0, cb, ldc_bytes);
      _tile_stored(1, cb + 16, ldc_bytes);
      _tile_stored(2, cb + 16 * ldc, ldc_bytes);
      _tile_stored(3, cb + 16 * ldc + 16, ldc_bytes);
    }
  }
}

}  // namespace hatkernels::cpu::HATK_CPU_LEVEL::max_amx
#endif
