// Row-major single-precision GEMMs on the BLAS that torch links (MKL's Fortran `sgemm_`,
// exported by libtorch_cpu), without including torch. Column-major BLAS sees a row-major
// matrix as its transpose, hence the swapped operands below. SingleThreadedBlas keeps MKL on
// one thread inside our own OpenMP threads (the tiles are the parallelism).
#pragma once
#include <cstdint>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

// MKL's per-thread thread count (C interface, exported by libtorch_cpu, which links MKL
// statically; the lower-case symbol is the Fortran one, which takes a pointer). Weak, so
// that a BLAS without it still links and loads.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace hatkernels::cpu::HATK_CPU_LEVEL {

namespace detail {
inline void sgemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                  int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
  sgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ia, b, &ib, &beta, c, &ic);
}
}  // namespace detail

// Held by every thread of a parallel region: one BLAS thread per OpenMP thread. Restores the
// thread's previous setting (0: the global one) on exit, since torch reuses these threads.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : prev_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int prev_;
};

// C[m, n] = alpha * A[m, k] * B[n, k]^T + beta * C   (row-major, leading dimensions given).
inline void gemm_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                    int64_t ldb, float* c, int64_t ldc, float alpha = 1.f, float beta = 0.f) {
  detail::sgemm('T', 'N', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// C[m, n] = alpha * A[m, k] * B[k, n] + beta * C.
inline void gemm_nn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                    int64_t ldb, float* c, int64_t ldc, float alpha = 1.f, float beta = 0.f) {
  detail::sgemm('N', 'N', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// C[m, n] = alpha * A[k, m]^T * B[k, n] + beta * C.
inline void gemm_tn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                    int64_t ldb, float* c, int64_t ldc, float alpha = 1.f, float beta = 0.f) {
  detail::sgemm('N', 'T', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

}  // namespace hatkernels::cpu::HATK_CPU_LEVEL
