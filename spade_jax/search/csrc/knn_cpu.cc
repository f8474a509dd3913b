// CPU kernel for spade_jax.neighbors: a gallery merged into a running top-k.
//
// XLA:CPU's matmul reaches about half of an optimised BLAS sgemm on the CPUs we
// measured, and the kNN search is one big matmul. This XLA FFI custom call computes
// the Metric's proxy blocks with the sgemm that SciPy ships (scipy.linalg.cython_blas,
// OpenBLAS), a cache-sized block at a time on each core, and selects from each block
// while it is still in cache. No [Q, M] or [Q, C] block ever reaches XLA, and the
// gallery rows are read where they lie (no per-chunk embedding copies).
//
// Semantics (equal to neighbors.stream_topk's XLA path over the same rows):
//   gallery row i * R + r is bank[blocks[i], r]; its embedding is
//   [bank[blocks[i], r], extra[i, r]], and proxy[q, row] = queries[q] . embedding
//   (+inf where valid[i, r] is false);
//   (best_v, best_i)[q] = the k smallest of the old candidates and the gallery's
//   (proxy, offset + row), ordered by (value, index); a candidate equal to the k-th
//   best is not taken (it has the higher index); +inf never enters a slot.
// Only the rounding of the proxies differs (another summation order); the caller
// recomputes the selected neighbours' distances exactly either way.
//
// The sgemm is looked up from Python (scipy's capsule) and handed over once with
// set_sgemm(address); without it the handler returns an error (the Python side never
// calls it then).

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

// Fortran sgemm as exported by scipy.linalg.cython_blas (LP64: 32-bit ints).
using SgemmFn = void (*)(const char* transa, const char* transb, const int* m,
                         const int* n, const int* k, const float* alpha, const float* a,
                         const int* lda, const float* b, const int* ldb, const float* beta,
                         float* c, const int* ldc);

std::atomic<SgemmFn> g_sgemm{nullptr};

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kLanes = 16;

// Smallest value of x[0, n), n >= 1. min is exact, so any evaluation order gives the
// same value (-0.0 and +0.0 compare equal, which is all the callers rely on).
// Portable version: kLanes independent accumulators, which compilers vectorise.
float RowMinPortable(const float* x, int64_t n) {
  float acc[kLanes];
  for (int t = 0; t < kLanes; ++t) acc[t] = kInf;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int t = 0; t < kLanes; ++t) acc[t] = x[j + t] < acc[t] ? x[j + t] : acc[t];
  }
  float best = kInf;
  for (int t = 0; t < kLanes; ++t) best = acc[t] < best ? acc[t] : best;
  for (; j < n; ++j) best = x[j] < best ? x[j] : best;
  return best;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPADE_X86_DISPATCH 1
// _mm*_min_ps(x, acc) is exactly `x < acc ? x : acc`.
__attribute__((target("avx512f"))) float RowMinAvx512(const float* x, int64_t n) {
  __m512 a0 = _mm512_set1_ps(kInf), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    a0 = _mm512_min_ps(_mm512_loadu_ps(x + j), a0);
    a1 = _mm512_min_ps(_mm512_loadu_ps(x + j + 16), a1);
    a2 = _mm512_min_ps(_mm512_loadu_ps(x + j + 32), a2);
    a3 = _mm512_min_ps(_mm512_loadu_ps(x + j + 48), a3);
  }
  for (; j + 16 <= n; j += 16) a0 = _mm512_min_ps(_mm512_loadu_ps(x + j), a0);
  a0 = _mm512_min_ps(_mm512_min_ps(a0, a1), _mm512_min_ps(a2, a3));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, a0);
  float best = kInf;
  for (int t = 0; t < 16; ++t) best = lanes[t] < best ? lanes[t] : best;
  for (; j < n; ++j) best = x[j] < best ? x[j] : best;
  return best;
}

__attribute__((target("avx2"))) float RowMinAvx2(const float* x, int64_t n) {
  __m256 a0 = _mm256_set1_ps(kInf), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    a0 = _mm256_min_ps(_mm256_loadu_ps(x + j), a0);
    a1 = _mm256_min_ps(_mm256_loadu_ps(x + j + 8), a1);
    a2 = _mm256_min_ps(_mm256_loadu_ps(x + j + 16), a2);
    a3 = _mm256_min_ps(_mm256_loadu_ps(x + j + 24), a3);
  }
  a0 = _mm256_min_ps(_mm256_min_ps(a0, a1), _mm256_min_ps(a2, a3));
  __m128 h = _mm_min_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
  h = _mm_min_ps(h, _mm_movehl_ps(h, h));
  h = _mm_min_ss(h, _mm_shuffle_ps(h, h, 1));
  float best = _mm_cvtss_f32(h);
  for (; j < n; ++j) best = x[j] < best ? x[j] : best;
  return best;
}
#endif

using RowMinFn = float (*)(const float*, int64_t);

// The instruction set of the minimum scan, chosen once from the CPU and changeable
// with set_isa() (spade_jax.cpu_kernel.set_isa, SPADE_JAX_CPU_KERNEL_ISA): the tests
// force each path that a user's CPU may take on the one machine they run on.
bool IsaSupported(const std::string& isa) {
  if (isa == "portable") return true;
#ifdef SPADE_X86_DISPATCH
  __builtin_cpu_init();
  if (isa == "avx512") return __builtin_cpu_supports("avx512f");
  if (isa == "avx2") return __builtin_cpu_supports("avx2");
#endif
  return false;
}

RowMinFn RowMinFor(const std::string& isa) {
#ifdef SPADE_X86_DISPATCH
  if (isa == "avx512") return RowMinAvx512;
  if (isa == "avx2") return RowMinAvx2;
#endif
  return RowMinPortable;
}

std::string BestIsa() {
  return IsaSupported("avx512") ? "avx512" : IsaSupported("avx2") ? "avx2" : "portable";
}

std::mutex g_isa_mu;
std::string g_isa = BestIsa();
std::atomic<RowMinFn> g_row_min{RowMinFor(g_isa)};

inline float RowMin(const float* x, int64_t n) {
  return g_row_min.load(std::memory_order_relaxed)(x, n);
}

// Inserts (v, idx) into the sorted slots (vals, ids)[0, k); v < vals[k - 1] and idx
// is larger than every index already there, so it goes after equal values.
inline void Insert(float v, int32_t idx, float* vals, int32_t* ids, int64_t k) {
  int64_t pos = k - 1;
  while (pos > 0 && vals[pos - 1] > v) {
    vals[pos] = vals[pos - 1];
    ids[pos] = ids[pos - 1];
    --pos;
  }
  vals[pos] = v;
  ids[pos] = idx;
}

// Columns examined per threshold test when k > 1: a vectorised minimum over the span,
// and only a span holding an entry below the k-th best is scanned entry by entry.
constexpr int64_t kSpan = 256;

// Merges rows [r0, r1) of a [rows, cols] proxy block (row stride ld) into the running
// top-k (best_v / best_i point at the block's first row). With a column bias, row r's
// proxies are first completed in place, block[r, j] += scale[r * scale_stride] *
// bias[j] (one rounding, stored, so every later read sees the same value), while the
// row is in L1.
void SelectRows(float* block, int64_t r0, int64_t r1, int64_t cols, int64_t ld,
                int64_t first_col, float* best_v, int32_t* best_i, int64_t k,
                const float* bias, const float* scale, int64_t scale_stride) {
  for (int64_t r = r0; r < r1; ++r) {
    float* x = block + r * ld;
    float* vals = best_v + r * k;
    int32_t* ids = best_i + r * k;
    if (bias != nullptr) {
      const float s = scale[r * scale_stride];
      for (int64_t j = 0; j < cols; ++j) x[j] = x[j] + s * bias[j];
    }
    if (k == 1) {
      const float m = RowMin(x, cols);
      if (m < vals[0]) {
        int64_t j = 0;
        while (j < cols && !(x[j] == m)) ++j;  // Lowest column holding the minimum.
        vals[0] = m;
        ids[0] = static_cast<int32_t>(first_col + j);
      }
      continue;
    }
    float threshold = vals[k - 1];
    for (int64_t j0 = 0; j0 < cols; j0 += kSpan) {
      const int64_t j1 = std::min(cols, j0 + kSpan);
      if (!(RowMin(x + j0, j1 - j0) < threshold)) continue;
      for (int64_t j = j0; j < j1; ++j) {
        if (x[j] < threshold) {
          Insert(x[j], static_cast<int32_t>(first_col + j), vals, ids, k);
          threshold = vals[k - 1];
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------
// Threads. OpenBLAS parallelises one sgemm over its own threads, which then spin
// between calls and leave no core for the selection. Instead each of our threads
// runs a single-threaded sgemm on its own rows of queries and selects from its block
// while it is in cache. While at least one call runs, the BLAS library that provides
// sgemm is set to one thread; the last call to finish restores its setting, which is
// also how many threads the calls use (so OPENBLAS_NUM_THREADS / threadpoolctl limits
// are respected). Without OpenBLAS's thread functions the calls run on one thread of
// ours and the BLAS threads as it likes.

using GetThreadsFn = int (*)();
using SetThreadsFn = void (*)(int);

struct BlasThreadControl {
  GetThreadsFn get = nullptr;
  SetThreadsFn set = nullptr;
  std::mutex mu;
  int active = 0;
  int saved = 1;

  // Looks the thread functions up in the shared object that holds `sgemm`.
  void Bind(void* sgemm) {
    Dl_info info;
    if (sgemm == nullptr || dladdr(sgemm, &info) == 0 || info.dli_fname == nullptr) return;
    void* lib = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) return;
    static const char* const kPrefixes[] = {"scipy_openblas", "openblas"};
    static const char* const kSuffixes[] = {"", "64_"};
    for (const char* prefix : kPrefixes) {
      for (const char* suffix : kSuffixes) {
        const std::string g = std::string(prefix) + "_get_num_threads" + suffix;
        const std::string s = std::string(prefix) + "_set_num_threads" + suffix;
        auto gf = reinterpret_cast<GetThreadsFn>(dlsym(lib, g.c_str()));
        auto sf = reinterpret_cast<SetThreadsFn>(dlsym(lib, s.c_str()));
        if (gf != nullptr && sf != nullptr) {
          std::lock_guard<std::mutex> lock(mu);
          get = gf;
          set = sf;
          return;  // The handle stays open: the functions must stay valid.
        }
      }
    }
    dlclose(lib);
  }

  // Returns how many threads this call may use.
  int Enter() {
    std::lock_guard<std::mutex> lock(mu);
    if (get == nullptr) return 1;
    if (active++ == 0) {
      saved = std::max(1, get());
      if (saved > 1) set(1);
    }
    return saved;
  }

  void Exit() {
    std::lock_guard<std::mutex> lock(mu);
    if (get == nullptr) return;
    if (--active == 0 && saved > 1) set(saved);
  }
};

BlasThreadControl g_blas_threads;

class BlasThreadsGuard {
 public:
  BlasThreadsGuard() : threads_(g_blas_threads.Enter()) {}
  ~BlasThreadsGuard() { g_blas_threads.Exit(); }
  int threads() const { return threads_; }

 private:
  int threads_;
};

// Proxy blocks are reused across calls: a fresh multi-MiB allocation per call would
// be page-faulted in again every time (measured: ~7% of the search).
class ScratchPool {
 public:
  std::unique_ptr<float[]> Get(size_t size, size_t* capacity) {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < free_.size(); ++i) {
      if (free_[i].second >= size) {
        std::unique_ptr<float[]> out = std::move(free_[i].first);
        *capacity = free_[i].second;
        free_.erase(free_.begin() + i);
        return out;
      }
    }
    *capacity = size;
    return std::unique_ptr<float[]>(new (std::nothrow) float[size]);
  }
  void Put(std::unique_ptr<float[]> block, size_t capacity) {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.size() < kMaxFree) free_.emplace_back(std::move(block), capacity);
  }

 private:
  static constexpr size_t kMaxFree = 64;
  std::mutex mu_;
  std::vector<std::pair<std::unique_ptr<float[]>, size_t>> free_;
};

ScratchPool g_scratch;

// The search of one gallery for a range of queries. The gallery is a list of blocks of
// a bank: gallery row i * R + r (before `first_index`) is bank row r of block
// blocks[i]. Its embedding is [rows, extra]: the first `dim` embedding columns are the
// bank rows themselves (read in place, never copied), the last `num_extra` come from
// extra[i, r] (e.g. |g|^2 for L2; like `valid`, laid out in gallery order, not bank
// order). A sub-chunk without a valid row is skipped (no sgemm).
// With a center c [dim], the rows are searched translated, bank row - c: each sub-chunk
// is copied minus c into a scratch block once (O(cb * dim) next to the sgemm's
// O(qb * cb * dim) per query block), so that L2's matmul form does not cancel on data
// with a large common offset. The caller translates the queries and extra columns.
struct SearchJob {
  const float* queries;  // [Q, emb] with emb = dim + num_extra
  const float* bank;     // [B, R, dim]
  const float* center;   // [dim] or null
  const float* extra;    // [num_blocks, R, num_extra]
  const bool* valid;     // [num_blocks, R] or null
  const int32_t* blocks;  // [num_blocks]
  int64_t num_blocks, block_rows, dim, num_extra, k, qb, cb, first_index;
  float* best_v;
  int32_t* best_i;
  SgemmFn sgemm;

  bool Run(int64_t q_begin, int64_t q_end) const {
    if (q_end <= q_begin) return true;
    size_t capacity = 0;
    std::unique_ptr<float[]> block = g_scratch.Get(qb * cb, &capacity);
    if (!block) return false;
    size_t rows_capacity = 0;
    std::unique_ptr<float[]> shifted;
    if (center != nullptr) {
      shifted = g_scratch.Get(cb * dim, &rows_capacity);
      if (!shifted) {
        g_scratch.Put(std::move(block), capacity);
        return false;
      }
    }
    const float one = 1.0f, zero = 0.0f;
    const int depth = static_cast<int>(dim), num_x = static_cast<int>(num_extra);
    const int emb = static_cast<int>(dim + num_extra);
    for (int64_t i = 0; i < num_blocks; ++i) {
      const int64_t base = static_cast<int64_t>(blocks[i]) * block_rows;  // In the bank.
      const int64_t row0 = i * block_rows;                                  // In the gallery.
      for (int64_t c0 = 0; c0 < block_rows; c0 += cb) {
        const int64_t cn = std::min(cb, block_rows - c0);
        const bool* ok = valid == nullptr ? nullptr : valid + row0 + c0;
        int64_t num_valid = cn;
        if (ok != nullptr) {
          num_valid = 0;
          for (int64_t c = 0; c < cn; ++c) num_valid += ok[c];
        }
        if (num_valid == 0) continue;
        const bool any_invalid = num_valid < cn;
        const float* rows = bank + (base + c0) * dim;
        if (center != nullptr) {
          for (int64_t c = 0; c < cn; ++c) {
            const float* src = rows + c * dim;
            float* dst = shifted.get() + c * dim;
            for (int64_t d = 0; d < dim; ++d) dst[d] = src[d] - center[d];
          }
          rows = shifted.get();
        }
        for (int64_t q0 = q_begin; q0 < q_end; q0 += qb) {
          const int64_t qn = std::min(qb, q_end - q0);
          // Column-major sgemm: block^T [cn, qn] = rows (dim x cn, transposed) times
          // queries[q0:q0+qn, :dim] (dim x qn, leading dimension emb), i.e. the
          // row-major block [qn, cn].
          const int m = static_cast<int>(cn), n = static_cast<int>(qn);
          sgemm("T", "N", &m, &n, &depth, &one, rows, &depth,
                queries + q0 * emb, &emb, &zero, block.get(), &m);
          // One extra column (|g|^2 for L2) is added during the selection; more go
          // through a second, rank-num_extra sgemm.
          if (num_x > 1) {
            sgemm("T", "N", &m, &n, &num_x, &one, extra + (row0 + c0) * num_extra, &num_x,
                  queries + q0 * emb + dim, &emb, &one, block.get(), &m);
          }
          if (any_invalid) {
            for (int64_t r = 0; r < qn; ++r) {
              for (int64_t c = 0; c < cn; ++c) {
                if (!ok[c]) block[r * cn + c] = kInf;
              }
            }
          }
          const bool fuse = num_x == 1;
          SelectRows(block.get(), 0, qn, cn, cn, first_index + i * block_rows + c0,
                     best_v + q0 * k, best_i + q0 * k, k,
                     fuse ? extra + row0 + c0 : nullptr, queries + q0 * emb + dim, emb);
        }
      }
    }
    g_scratch.Put(std::move(block), capacity);
    if (shifted) g_scratch.Put(std::move(shifted), rows_capacity);
    return true;
  }
};

ffi::Error TopkUnguarded(ffi::Buffer<ffi::F32> queries, ffi::Buffer<ffi::F32> bank,
                    ffi::Buffer<ffi::F32> extra, ffi::Buffer<ffi::PRED> valid,
                    ffi::Buffer<ffi::S32> blocks, ffi::Buffer<ffi::S32> offset,
                    ffi::Buffer<ffi::F32> center, ffi::Buffer<ffi::F32> vals_in, ffi::Buffer<ffi::S32> ids_in,
                    int64_t query_block, int64_t sub_chunk,
                    ffi::ResultBuffer<ffi::F32> vals_out,
                    ffi::ResultBuffer<ffi::S32> ids_out) {
  const SgemmFn sgemm = g_sgemm.load();
  if (sgemm == nullptr) {
    return ffi::Error::InvalidArgument("spade_jax knn_cpu: no sgemm was set");
  }
  const auto qd = queries.dimensions();
  const auto bd = bank.dimensions();
  const auto xd = extra.dimensions();
  const auto vd = vals_in.dimensions();
  if (qd.size() != 2 || bd.size() != 3 || xd.size() != 3 || vd.size() != 2 ||
      blocks.dimensions().size() != 1 || xd[0] != blocks.dimensions()[0] ||
      xd[1] != bd[1] || qd[1] != bd[2] + xd[2] || vd[0] != qd[0] ||
      ids_in.element_count() != vals_in.element_count() || offset.element_count() != 1 ||
      (valid.element_count() != 0 &&
       valid.element_count() != static_cast<size_t>(xd[0] * xd[1])) ||
      (center.element_count() != 0 && center.element_count() != static_cast<size_t>(bd[2]))) {
    return ffi::Error::InvalidArgument("spade_jax knn_cpu: inconsistent shapes");
  }
  const int64_t num_q = qd[0], num_bank = bd[0], block_rows = bd[1], dim = bd[2];
  const int64_t num_extra = xd[2], k = vd[1];
  const int64_t num_blocks = blocks.dimensions()[0];
  if (query_block < 1 || sub_chunk < 1 || k < 1 || qd[1] > INT32_MAX ||
      num_q > INT32_MAX || num_blocks * block_rows > INT32_MAX) {
    return ffi::Error::InvalidArgument("spade_jax knn_cpu: bad sizes");
  }
  const int32_t* block_ids = blocks.typed_data();
  for (int64_t i = 0; i < num_blocks; ++i) {
    if (block_ids[i] < 0 || block_ids[i] >= num_bank) {
      return ffi::Error::InvalidArgument("spade_jax knn_cpu: block id out of range");
    }
  }
  float* best_v = vals_out->typed_data();
  int32_t* best_i = ids_out->typed_data();
  if (best_v != vals_in.typed_data()) {
    std::memcpy(best_v, vals_in.typed_data(), sizeof(float) * num_q * k);
  }
  if (best_i != ids_in.typed_data()) {
    std::memcpy(best_i, ids_in.typed_data(), sizeof(int32_t) * num_q * k);
  }
  if (num_q == 0 || num_blocks == 0 || block_rows == 0) return ffi::Error::Success();

  const int64_t qb = std::min(query_block, num_q);
  const int64_t cb = std::min(sub_chunk, block_rows);
  BlasThreadsGuard guard;
  // At least one block of queries per thread, so a small search stays on one thread.
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>(guard.threads(), num_q / std::max<int64_t>(qb / 2, 1)));
  // A zero center (the caller found no common offset to remove) reads rows in place.
  const float* shift = nullptr;
  for (size_t d = 0; d < center.element_count(); ++d) {
    if (center.typed_data()[d] != 0.0f) {
      shift = center.typed_data();
      break;
    }
  }
  const SearchJob job{queries.typed_data(), bank.typed_data(), shift,
                      extra.typed_data(),
                      valid.element_count() ? valid.typed_data() : nullptr, block_ids,
                      num_blocks, block_rows, dim, num_extra, k, qb, cb,
                      offset.typed_data()[0], best_v, best_i, sgemm};
  std::vector<std::thread> helpers;
  std::vector<int> failed(parts, 0);
  auto run_part = [&job, &failed, num_q, parts](int64_t p) {
    failed[p] = !job.Run(num_q * p / parts, num_q * (p + 1) / parts);
  };
  for (int64_t p = 1; p < parts; ++p) {
    try {
      helpers.emplace_back(run_part, p);
    } catch (...) {  // No thread to be had: this part runs on the calling thread.
      run_part(p);
    }
  }
  run_part(0);
  for (auto& t : helpers) t.join();
  if (std::any_of(failed.begin(), failed.end(), [](int f) { return f != 0; })) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "spade_jax knn_cpu: out of memory");
  }
  return ffi::Error::Success();
}

// No C++ exception may cross into XLA: any that escapes becomes an error status.
ffi::Error TopkImpl(ffi::Buffer<ffi::F32> queries, ffi::Buffer<ffi::F32> bank,
                    ffi::Buffer<ffi::F32> extra, ffi::Buffer<ffi::PRED> valid,
                    ffi::Buffer<ffi::S32> blocks, ffi::Buffer<ffi::S32> offset,
                    ffi::Buffer<ffi::F32> center, ffi::Buffer<ffi::F32> vals_in, ffi::Buffer<ffi::S32> ids_in,
                    int64_t query_block, int64_t sub_chunk,
                    ffi::ResultBuffer<ffi::F32> vals_out,
                    ffi::ResultBuffer<ffi::S32> ids_out) {
  try {
    return TopkUnguarded(queries, bank, extra, valid, blocks, offset, center, vals_in, ids_in,
                         query_block, sub_chunk, vals_out, ids_out);
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("spade_jax knn_cpu: ") + e.what());
  } catch (...) {
    return ffi::Error(ffi::ErrorCode::kInternal, "spade_jax knn_cpu: unknown C++ exception");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpadeTopkF32, TopkImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // queries [Q, D + X]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bank [B, R, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // extra [nb, R, X]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // valid [nb, R] or [0]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // blocks [nb]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // offset []
                                  .Arg<ffi::Buffer<ffi::F32>>()   // center [D] or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // best values [Q, k]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // best indices [Q, k]
                                  .Attr<int64_t>("query_block")
                                  .Attr<int64_t>("sub_chunk")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// ------------------------------------------------------------------------------------
// Python module: handlers() -> {name: capsule}; set_sgemm(address).

static PyObject* Handlers(PyObject*, PyObject*) {
  PyObject* dict = PyDict_New();
  if (dict == nullptr) return nullptr;
  PyObject* capsule =
      PyCapsule_New(reinterpret_cast<void*>(&SpadeTopkF32), nullptr, nullptr);
  if (capsule == nullptr || PyDict_SetItemString(dict, "spade_topk_f32", capsule)) {
    Py_XDECREF(capsule);
    Py_DECREF(dict);
    return nullptr;
  }
  Py_DECREF(capsule);
  return dict;
}

static PyObject* SetSgemm(PyObject*, PyObject* arg) {
  const unsigned long long address = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  if (address == 0) {
    PyErr_SetString(PyExc_ValueError, "sgemm address must be non-zero");
    return nullptr;
  }
  void* sgemm = reinterpret_cast<void*>(static_cast<uintptr_t>(address));
  g_blas_threads.Bind(sgemm);
  g_sgemm.store(reinterpret_cast<SgemmFn>(sgemm));
  return PyBool_FromLong(g_blas_threads.get != nullptr);
}

static PyObject* SetIsa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  std::string isa(name);
  if (isa == "auto") isa = BestIsa();
  if (isa != "avx512" && isa != "avx2" && isa != "portable") {
    return PyErr_Format(PyExc_ValueError, "unknown instruction set %R", arg);
  }
  if (!IsaSupported(isa)) {
    return PyErr_Format(PyExc_ValueError, "this CPU does not support %s", isa.c_str());
  }
  std::lock_guard<std::mutex> lock(g_isa_mu);
  g_isa = isa;
  g_row_min.store(RowMinFor(isa));
  return PyUnicode_FromString(isa.c_str());
}

static PyObject* GetIsa(PyObject*, PyObject*) {
  std::lock_guard<std::mutex> lock(g_isa_mu);
  return PyUnicode_FromString(g_isa.c_str());
}

static PyMethodDef kMethods[] = {
    {"set_isa", SetIsa, METH_O,
     "Chooses the selection's instruction set (auto, avx512, avx2, portable); returns\n"
     "the one chosen. ValueError if this CPU lacks it."},
    {"isa", GetIsa, METH_NOARGS, "The selection's instruction set."},
    {"handlers", Handlers, METH_NOARGS, "XLA FFI handler capsules by target name."},
    {"set_sgemm", SetSgemm, METH_O,
     "Sets the Fortran-ABI sgemm (LP64) by address; returns whether its library's\n"
     "OpenBLAS thread functions were found."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_knn_cpu",
                              "spade_jax CPU kNN kernel (XLA FFI).", -1, kMethods};

PyMODINIT_FUNC PyInit__knn_cpu(void) { return PyModule_Create(&kModule); }
