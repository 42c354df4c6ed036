// The fused focal loss on the CPU: one pass over [B, C, S] logits of any strides.
//
// Built on first use by segfocal/losses/cpu_kernels.py and called through ctypes (plain C entry
// points, no Python or PyTorch headers, so it compiles in seconds). Pixels are cut into
// tiles; each tile's logits are staged as float32 in a small [C][P] buffer (L1/L2-sized), so the
// logits are read from memory once and the gradient is written once, whatever the layout. The
// loops over the P pixels of a tile have no branches and call only the inline exp/log below, so
// the compiler vectorises them. Runs of consecutive tiles ("units", fixed by the problem's size
// alone) are handed out one at a time to the threads of a persistent pool and to the calling
// thread; each unit's float64 sums are kept apart and added in unit order, so the result is
// the same to the bit whatever the thread count and scheduling.
//
// Arithmetic matches the Triton kernels (triton_kernels.py): 1 - p_t is the other classes' mass and
// p_t the label's, each over the normaliser; the log of the larger is log1p of minus the smaller (for
// -log p_t as p_t -> 1, for (1 - p_t)^gamma = exp(gamma log(1 - p_t)) as p_t -> 0); the gradient is
// H * (onehot - softmax).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include <pthread.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

constexpr float kTiny = 1.17549435e-38f;  // float32's smallest normal
constexpr float kInf = std::numeric_limits<float>::infinity();

inline float from_bits(uint32_t bits) { float value; std::memcpy(&value, &bits, 4); return value; }
inline uint32_t to_bits(float value) { uint32_t bits; std::memcpy(&bits, &value, 4); return bits; }

// Round to the nearest integer (|x| < 2^22) with the 1.5 * 2^23 trick: no floor() call to vectorise.
inline float round_nearest(float x) { return (x + 12582912.0f) - 12582912.0f; }

// e^x for x <= 88 (the uses here have x <= 0): Cody-Waite reduction by ln 2 and a degree-6
// polynomial on [-ln2/2, ln2/2] (Cephes' minimax coefficients), about 1 ulp. Results below
// float32's normal range flush to 0; NaN stays NaN.
inline float exp_approx(float x) {
  float clamped = x < -87.33654f ? -87.33654f : (x > 88.0f ? 88.0f : x);
  float n = round_nearest(clamped * 1.44269504088896341f);
  n = n == n ? n : 0.0f;
  float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  float result = p * from_bits(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return x < -87.33654f ? 0.0f : result;
}

// ln x for positive normal x (the uses here), +inf and NaN: x = m 2^e with m in [sqrt(1/2),
// sqrt(2)), and a degree-9 polynomial in m - 1 (Cephes' coefficients), about 1 ulp.
inline float log_approx(float x) {
  uint32_t bits = to_bits(x);
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 126);
  float m = from_bits((bits & 0x007fffffu) | 0x3f000000u);  // in [0.5, 1)
  float low = m < 0.70710678118654752f ? 1.0f : 0.0f;  // then use 2m in [sqrt(1/2), 1) and e - 1
  e -= low;
  m = m + low * m - 1.0f;
  float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z - 2.12194440e-4f * e - 0.5f * z;
  float result = m + y + 0.693359375f * e;
  return x < kInf ? result : x;  // +inf and NaN pass through
}

struct Float32 {
  using type = float;
  static float load(float value) { return value; }
  static float store(float value) { return value; }
};

struct BFloat16 {  // bfloat16 is the upper half of a float32; stores round to nearest even
  using type = uint16_t;
  static float load(uint16_t value) { return from_bits(static_cast<uint32_t>(value) << 16); }
  static uint16_t store(float value) {
    uint32_t bits = to_bits(value);
    uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return value == value ? static_cast<uint16_t>(rounded) : static_cast<uint16_t>(0x7fc0u);
  }
};

}  // namespace

extern "C" {

// Everything one call needs; mirrored by a ctypes.Structure in cpu_kernels.py.
struct FocalProblem {
  const void* logits;        // [B, C, S] with the strides below (elements)
  const void* labels;        // [B, S]
  void* grad;                // [B, C, S], or null: no gradient
  const float* coefficients; // [C + 1]: w a / D per class, 0 for ignored pixels
  double* focal_sums;        // out [C]: sum of (1 - p_t)^gamma (-log p_t) per label class
  double* poly_sum;          // out [1]: sum of (1 - p_t)^(gamma + 1)
  double* counts;            // out [C]: label histogram (histogram entry point only)
  int64_t batch, classes, spatial;
  int64_t stride_b, stride_c, stride_s;
  int64_t label_stride_b, label_stride_s;
  int64_t grad_stride_b, grad_stride_c, grad_stride_s;
  int64_t ignore_index;
  int64_t has_ignore;        // 0 when ignore_index does not fit the label dtype
  int64_t logits_dtype;      // 0 float32, 1 bfloat16
  int64_t label_dtype;       // 0 int64, 1 int32, 2 uint8
  int64_t num_threads;       // at most this many threads,
  int64_t grain;             // each with at least this many logits (histogram: labels) to process
  int64_t tile;              // pixels per tile (rounded up to a multiple of 16), 0: about 32 KiB of float32
  double gamma, poly_coefficient, upstream;
};

}  // extern "C"

namespace {

// ---- Threads: a persistent pool and units of work handed out one at a time ----------------------
//
// Fresh threads per call, each with a fixed share of the tiles, let one thread the scheduler puts
// aside stall the whole call. Here the workers live across calls (sleeping between them), and a
// shared counter hands out one unit at a time to whichever thread is free, the calling thread
// too: a thread put aside delays the call by at most the unit it holds.

// One call's work: run(context, slot, unit) for every unit in [0, units); slot 0 is the calling
// thread, 1.. the workers (an index for per-thread scratch). run must not throw.
struct Job {
  void (*run)(void* context, int64_t slot, int64_t unit);
  void* context;
  int64_t units;
  std::atomic<int64_t> next{0};

  Job(void (*run)(void*, int64_t, int64_t), void* context, int64_t units) : run(run), context(context), units(units) {}
  void drain(int64_t slot) {
    for (int64_t unit = next.fetch_add(1); unit < units; unit = next.fetch_add(1)) run(context, slot, unit);
  }
};

// Worker threads made on demand (up to the most ever asked for), asleep between jobs. One job at
// a time: the caller of run() holds the process-wide lock below.
class Pool {
 public:
  // Run the job on the calling thread and up to `helpers` workers; returns when every unit is done.
  // Workers that cannot be created leave their share to the threads there are.
  void run(Job& job, int64_t helpers) {
    grow(helpers);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      helpers_ = helpers;
      ++generation_;
    }
    wake_.notify_all();
    job.drain(0);
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = nullptr;  // a worker waking from now on leaves it alone; wait for those still on a unit
    idle_.wait(lock, [this] { return busy_ == 0; });
  }

 private:
  void grow(int64_t wanted) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (static_cast<int64_t>(workers_.size()) < wanted) {
      try {
        workers_.emplace_back(&Pool::work, this, static_cast<int64_t>(workers_.size()) + 1, generation_);
      } catch (const std::system_error&) {  // no more threads to be had
        return;
      }
    }
  }

  void work(int64_t slot, uint64_t seen) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      Job* job = job_;
      if (job == nullptr || slot > helpers_) continue;
      ++busy_;
      lock.unlock();
      job->drain(slot);
      lock.lock();
      if (--busy_ == 0) idle_.notify_all();
    }
  }

  std::mutex mutex_;  // guards the fields below
  std::condition_variable wake_, idle_;
  std::vector<std::thread> workers_;
  Job* job_ = nullptr;  // the job in progress, null between jobs
  int64_t helpers_ = 0;  // workers with slot <= helpers_ take part in it
  uint64_t generation_ = 0;  // counts the jobs posted
  int64_t busy_ = 0;  // workers inside drain()
};

std::mutex calls;  // one pooled call at a time, process-wide
Pool* pool = nullptr;  // made on first use and never destroyed: its workers sleep until the process exits

// A forked child has only the forking thread: the parent's workers are not there. Forking waits
// for the pooled call in progress (so no lock is copied held), and the child drops the pool (its
// memory is left behind) and makes its own on its first call.
void pool_before_fork() { calls.lock(); }
void pool_after_fork_in_parent() { calls.unlock(); }
void pool_after_fork_in_child() {
  pool = nullptr;
  calls.unlock();
}

// Whether the fork handlers are registered (once per process: a second registration would lock
// `calls` twice before a fork). Without them (out of memory) no pool is made.
bool fork_handlers_registered() {
  static const bool registered =
      pthread_atfork(pool_before_fork, pool_after_fork_in_parent, pool_after_fork_in_child) == 0;
  return registered;
}

// Run work(slot, unit) for every unit in [0, units) on up to `threads` threads, this one included;
// slot < threads identifies the thread. Work must not throw.
template <typename Work>
void parallel_units(int64_t units, int64_t threads, Work& work) {
  threads = std::max<int64_t>(1, std::min(threads, units));
  if (threads == 1 || !fork_handlers_registered()) {  // no pool, no lock: single-threaded calls from several threads run side by side
    for (int64_t unit = 0; unit < units; ++unit) work(0, unit);
    return;
  }
  Job job([](void* context, int64_t slot, int64_t unit) { (*static_cast<Work*>(context))(slot, unit); }, &work,
          units);
  std::lock_guard<std::mutex> lock(calls);
  if (pool == nullptr) pool = new Pool;
  pool->run(job, threads - 1);
}

// The units of a pass over `tiles` tiles: at most kMaxUnits runs of consecutive tiles, fixed by the
// number of tiles alone. Per-unit partial sums, added in unit order, do not depend on which thread
// ran which unit; at most kMaxUnits of them bound the memory they take.
constexpr int64_t kMaxUnits = 256;
struct Units {
  int64_t tiles, count;
  explicit Units(int64_t tiles) : tiles(tiles), count(std::min(tiles, kMaxUnits)) {}
  int64_t first(int64_t unit) const { return tiles * unit / count; }  // its tiles: [first(unit), first(unit + 1))
};

// The labels of a tile as class indices, -1 where ignored, out of range or padding.
template <typename Label>
void load_labels(const FocalProblem& p, int64_t b, int64_t s0, int64_t n, int64_t tile, int32_t* labels) {
  const Label* row = static_cast<const Label*>(p.labels) + b * p.label_stride_b + s0 * p.label_stride_s;
  for (int64_t i = 0; i < tile; ++i) {
    int64_t label = i < n ? static_cast<int64_t>(row[i * p.label_stride_s]) : -1;
    bool counts = label >= 0 && label < p.classes && !(p.has_ignore && label == p.ignore_index);
    labels[i] = counts ? static_cast<int32_t>(label) : -1;
  }
}

template <typename Label>
void histogram(const FocalProblem& p) {
  int64_t tiles_per_row = (p.spatial + 255) / 256;
  Units units(p.batch * tiles_per_row);
  std::vector<int64_t> partial(units.count * p.classes, 0);  // [unit][class]
  auto work = [&](int64_t, int64_t unit) {
    int32_t labels[256];
    int64_t* counts = partial.data() + unit * p.classes;
    for (int64_t t = units.first(unit); t < units.first(unit + 1); ++t) {
      int64_t b = t / tiles_per_row, s0 = (t % tiles_per_row) * 256;
      int64_t n = std::min<int64_t>(256, p.spatial - s0);
      load_labels<Label>(p, b, s0, n, 256, labels);
      for (int64_t i = 0; i < n; ++i)
        if (labels[i] >= 0) ++counts[labels[i]];
    }
  };
  parallel_units(units.count, std::min(p.num_threads, p.batch * p.spatial / p.grain), work);
  for (int64_t c = 0; c < p.classes; ++c) {
    p.counts[c] = 0.0;
    for (int64_t unit = 0; unit < units.count; ++unit)
      p.counts[c] += static_cast<double>(partial[unit * p.classes + c]);
  }
}

// Per-thread scratch for one tile of `tile` pixels.
struct Scratch {
  std::vector<float> values;  // [C][tile]: logits, then exps, then the gradient
  std::vector<float> peak, other, label_shifted, focal, poly, coefficient, grad_other, grad_label;
  std::vector<int32_t> labels;
  Scratch(int64_t classes, int64_t tile)
      : values(classes * tile), peak(tile), other(tile), label_shifted(tile), focal(tile), poly(tile),
        coefficient(tile), grad_other(tile), grad_label(tile), labels(tile) {}
};

// Per pixel of a tile, from the other classes' mass and the label's shifted logit: the focal term
// (1 - p_t)^gamma (-log p_t) and Poly-1 term (1 - p_t)^(gamma + 1) (0 where ignored) and, for the
// gradient H * (onehot - softmax), -H / normaliser (times exp(z - max)) and H (1 - p_t) at the
// label, H = dL/dp_t * p_t * upstream. A function of its own with restrict pointers: one loop the
// compiler vectorises without aliasing checks.
template <bool kWriteGrad>
void pixel_terms(int64_t tile, float gamma, float poly_coefficient, float upstream,
                 const int32_t* __restrict labels, const float* __restrict other,
                 const float* __restrict label_shifted, const float* __restrict coefficient,
                 float* __restrict focal, float* __restrict poly, float* __restrict grad_other,
                 float* __restrict grad_label) {
  for (int64_t i = 0; i < tile; ++i) {
    bool valid = labels[i] >= 0;
    float label_mass = exp_approx(label_shifted[i]);
    float normaliser = other[i] + label_mass;
    float one_minus_pt = other[i] / normaliser;
    float p_t = label_mass / normaliser;
    bool near_one = one_minus_pt < 0.5f;  // p_t is the larger; comparisons written so NaN passes
    float small = near_one ? one_minus_pt : (p_t > 0.5f ? 0.5f : p_t);
    float shifted_one = 1.0f - small;  // log(1 - small) = log1p(-small) by Goldberg's correction
    float ratio = shifted_one == 1.0f ? 1.0f : -small / (shifted_one - 1.0f);
    float log_shifted_one = log_approx(shifted_one);
    float log_larger = shifted_one == 1.0f ? -small : log_shifted_one * ratio;
    float log_pt = label_shifted[i] - log_approx(normaliser);
    float neg_log_pt = near_one ? -log_larger : -(log_pt > 0.0f ? 0.0f : log_pt);
    one_minus_pt = one_minus_pt < kTiny ? kTiny : one_minus_pt;
    float log_one_minus_pt = near_one ? log_approx(one_minus_pt) : log_larger;
    float modulated = exp_approx(gamma * log_one_minus_pt);
    focal[i] = valid ? modulated * neg_log_pt : 0.0f;
    poly[i] = valid ? modulated * one_minus_pt : 0.0f;
    if (kWriteGrad) {
      // d/dp_t [-(1-p)^g log p] * p = g (1-p)^g p log(p)/(1-p) - (1-p)^g, finite as p -> 1
      float log_ratio = one_minus_pt > kTiny ? -neg_log_pt / one_minus_pt : -1.0f;
      float focal_slope = gamma * modulated * p_t * log_ratio - modulated;
      float poly_slope = -(gamma + 1.0f) * modulated * p_t;  // d/dp_t [(1-p)^(g+1)] * p
      float scalar = (coefficient[i] * focal_slope + (valid ? poly_coefficient * poly_slope : 0.0f)) * upstream;
      grad_other[i] = -scalar / normaliser;
      grad_label[i] = scalar * one_minus_pt;
    }
  }
}

// Add a tile's focal terms to their label's float64 sum and its Poly-1 terms to the float64 total
// (in 16 float32 lanes first: a reduction the compiler vectorises; padding pixels hold 0).
void accumulate(int64_t n, int64_t tile, const int32_t* __restrict labels, const float* __restrict focal,
                const float* __restrict poly, double* __restrict focal_sums, double* __restrict poly_sum) {
  for (int64_t i = 0; i < n; ++i)
    if (labels[i] >= 0) focal_sums[labels[i]] += focal[i];
  float lanes[16] = {};
  for (int64_t start = 0; start < tile; start += 16)
    for (int64_t k = 0; k < 16; ++k) lanes[k] += poly[start + k];
  double total = 0.0;
  for (float lane : lanes) total += lane;
  *poly_sum += total;
}

template <typename Logit, typename Label, bool kWriteGrad>
void focal_tile(const FocalProblem& p, int64_t b, int64_t s0, int64_t n, int64_t tile, Scratch& s, double* focal_sums,
                double* poly_sum) {
  using Stored = typename Logit::type;
  const int64_t C = p.classes;
  const float gamma = static_cast<float>(p.gamma);
  float* values = s.values.data();
  int32_t* labels = s.labels.data();
  float *peak = s.peak.data(), *other = s.other.data(), *label_shifted = s.label_shifted.data();
  load_labels<Label>(p, b, s0, n, tile, labels);

  // Stage the tile as float32 [C][tile] (padding pixels read 0), and take each pixel's maximum.
  const Stored* base = static_cast<const Stored*>(p.logits) + b * p.stride_b + s0 * p.stride_s;
  for (int64_t c = 0; c < C; ++c) {
    const Stored* row = base + c * p.stride_c;
    float* out = values + c * tile;
    if (p.stride_s == 1) {
      for (int64_t i = 0; i < n; ++i) out[i] = Logit::load(row[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) out[i] = Logit::load(row[i * p.stride_s]);
    }
    for (int64_t i = n; i < tile; ++i) out[i] = 0.0f;
  }
  for (int64_t i = 0; i < tile; ++i) peak[i] = values[i];
  for (int64_t c = 1; c < C; ++c) {
    const float* row = values + c * tile;
    for (int64_t i = 0; i < tile; ++i) peak[i] = row[i] > peak[i] ? row[i] : (row[i] == row[i] ? peak[i] : row[i]);
  }

  // exp(z - max) in place; the other classes' mass and the label's shifted logit.
  for (int64_t i = 0; i < tile; ++i) { other[i] = 0.0f; label_shifted[i] = 0.0f; }
  for (int64_t c = 0; c < C; ++c) {
    float* row = values + c * tile;
    const int32_t klass = static_cast<int32_t>(c);
    for (int64_t i = 0; i < tile; ++i) {
      float shifted = row[i] - peak[i];
      float e = exp_approx(shifted);
      row[i] = e;
      bool is_label = labels[i] == klass;
      other[i] += is_label ? 0.0f : e;
      label_shifted[i] += is_label ? shifted : 0.0f;
    }
  }

  // Per pixel: the focal and Poly-1 terms, and the gradient's two scalars.
  float *focal = s.focal.data(), *poly = s.poly.data(), *coefficient = s.coefficient.data();
  float *grad_other = s.grad_other.data(), *grad_label = s.grad_label.data();
  for (int64_t i = 0; i < tile; ++i) coefficient[i] = p.coefficients[labels[i] >= 0 ? labels[i] : C];
  pixel_terms<kWriteGrad>(tile, gamma, static_cast<float>(p.poly_coefficient), static_cast<float>(p.upstream), labels,
                          other, label_shifted, coefficient, focal, poly, grad_other, grad_label);
  accumulate(n, tile, labels, focal, poly, focal_sums, poly_sum);
  if (!kWriteGrad) return;

  // The gradient H * (onehot - softmax), written in the gradient's dtype and strides.
  Stored* grad = static_cast<Stored*>(p.grad) + b * p.grad_stride_b + s0 * p.grad_stride_s;
  for (int64_t c = 0; c < C; ++c) {
    const float* row = values + c * tile;
    const int32_t klass = static_cast<int32_t>(c);
    Stored* out = grad + c * p.grad_stride_c;
    if (p.grad_stride_s == 1) {
      for (int64_t i = 0; i < n; ++i)
        out[i] = Logit::store(labels[i] == klass ? grad_label[i] : grad_other[i] * row[i]);
    } else {
      for (int64_t i = 0; i < n; ++i)
        out[i * p.grad_stride_s] = Logit::store(labels[i] == klass ? grad_label[i] : grad_other[i] * row[i]);
    }
  }
}

// A fresh gradient buffer is mapped but not yet touched: backing it with 2 MiB pages (where the
// kernel offers transparent huge pages on request) replaces 512 page faults by one per 2 MiB, which
// on a fresh buffer costs more than the kernel's arithmetic. A hint only: nothing changes if refused.
template <typename Stored>
void advise_huge_pages(const FocalProblem& p) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  int64_t extent = 1 + (p.batch - 1) * p.grad_stride_b + (p.classes - 1) * p.grad_stride_c
                   + (p.spatial - 1) * p.grad_stride_s;  // elements spanned (strides are non-negative)
  uintptr_t start = reinterpret_cast<uintptr_t>(p.grad);
  uintptr_t first = (start + kHuge - 1) & ~(kHuge - 1);
  uintptr_t last = (start + static_cast<uintptr_t>(extent) * sizeof(Stored)) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)p;
#endif
}

template <typename Logit, typename Label, bool kWriteGrad>
void focal(const FocalProblem& p) {
  // a multiple of 16 pixels (accumulate() sums the Poly-1 terms 16 at a time)
  int64_t tile = p.tile > 0 ? (p.tile + 15) / 16 * 16
                            : std::max<int64_t>(16, std::min<int64_t>(512, (8192 / p.classes) / 16 * 16));
  int64_t tiles_per_row = (p.spatial + tile - 1) / tile;
  const int64_t C = p.classes;
  Units units(p.batch * tiles_per_row);
  int64_t threads = std::max<int64_t>(1, std::min({p.num_threads, p.batch * p.spatial * C / p.grain, units.count}));
  if (kWriteGrad) advise_huge_pages<typename Logit::type>(p);
  std::vector<Scratch> scratch;
  for (int64_t t = 0; t < threads; ++t) scratch.emplace_back(C, tile);
  std::vector<double> partial(units.count * (C + 1), 0.0);  // [unit]: C focal sums, then the Poly-1 sum
  auto work = [&](int64_t slot, int64_t unit) {
    double* sums = partial.data() + unit * (C + 1);
    for (int64_t t = units.first(unit); t < units.first(unit + 1); ++t) {
      int64_t b = t / tiles_per_row, s0 = (t % tiles_per_row) * tile;
      focal_tile<Logit, Label, kWriteGrad>(p, b, s0, std::min(tile, p.spatial - s0), tile, scratch[slot], sums,
                                           sums + C);
    }
  };
  parallel_units(units.count, threads, work);
  for (int64_t c = 0; c <= C; ++c) {
    double total = 0.0;
    for (int64_t unit = 0; unit < units.count; ++unit) total += partial[unit * (C + 1) + c];
    (c < C ? p.focal_sums[c] : *p.poly_sum) = total;
  }
}

template <typename Logit, typename Label>
void focal_by_grad(const FocalProblem& p) {
  if (p.grad != nullptr) focal<Logit, Label, true>(p); else focal<Logit, Label, false>(p);
}

template <typename Logit>
void focal_by_label(const FocalProblem& p) {
  switch (p.label_dtype) {
    case 0: focal_by_grad<Logit, int64_t>(p); break;
    case 1: focal_by_grad<Logit, int32_t>(p); break;
    default: focal_by_grad<Logit, uint8_t>(p); break;
  }
}

}  // namespace

extern "C" {

// The entry points return 0, -1 for a dtype code they do not know or no classes, and -2 when
// memory could not be had (no C++ exception crosses into the caller; threads that cannot be had leave
// their units to the others, the calling thread at least).

// The label histogram into p->counts.
int segfocal_histogram(const FocalProblem* p) {
  if (p->classes <= 0) return -1;
  try {
    switch (p->label_dtype) {
      case 0: histogram<int64_t>(*p); return 0;
      case 1: histogram<int32_t>(*p); return 0;
      case 2: histogram<uint8_t>(*p); return 0;
      default: return -1;
    }
  } catch (const std::exception&) {
    return -2;
  }
}

// The focal and Poly-1 sums, and the gradient when p->grad is set.
int segfocal_forward(const FocalProblem* p) {
  if (p->classes <= 0 || p->label_dtype < 0 || p->label_dtype > 2) return -1;
  try {
    switch (p->logits_dtype) {
      case 0: focal_by_label<Float32>(*p); return 0;
      case 1: focal_by_label<BFloat16>(*p); return 0;
      default: return -1;
    }
  } catch (const std::exception&) {
    return -2;
  }
}

}  // extern "C"
