// A caching CPU allocator for training steps (dtn_kernels.cpu_allocator documents the Python side).
//
// Why: a training step allocates and frees the same buffers every step (activations, their
// gradients, optimizer temporaries: here 0.25 to 4 MB each). glibc serves them from its heap mixed
// with small long-lived objects, so the step's buffers end up spread over about twice the memory they
// need at once, and every page of that spread stays resident; asking glibc to return freed memory
// instead (a low mmap threshold, a trim after each step) makes every step fault its buffers in afresh.
//
// What: tensors of kMinBlock bytes up to kMaxBlock bytes are carved out of large anonymous mappings
// (segments) with best-fit placement; a freed block merges with free neighbours and is reused by later
// requests. Only pages that a tensor was written to become resident, so a step's resident memory is
// close to the most it held at once, and it stays put from step to step (no page faults after the
// first steps). Smaller and larger requests go to c10::alloc_cpu / c10::free_cpu as with torch's own
// CPU allocator (small ones are what glibc does well; large ones are long-lived: weights, tables).
//
// One mutex guards the pool; a fork (DataLoader workers) takes it first, so the child's copy is
// consistent. Freed memory stays mapped: empty_cache() returns the pages of free blocks to the system.
#include <sys/mman.h>
#include <pthread.h>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

#include "caching_allocator.h"

namespace dtn {
namespace {

constexpr size_t kPage = 4096;
constexpr size_t kMinBlock = size_t(64) << 10;    // smaller requests: the system allocator
constexpr size_t kMaxBlock = size_t(64) << 20;    // larger ones too (long-lived: tables, weights)
constexpr size_t kSegment = size_t(256) << 20;    // one mapping: virtual space, resident only where written

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

struct Block {
  size_t size;
  bool free;
  int segment;
};

class CachingCPUAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    size_t charged = n;
    if (n >= kMinBlock && n <= kMaxBlock) {
      std::lock_guard<std::mutex> lock(mu_);
      const size_t c = round_up(n, kPage);
      p = take(c);
      if (p != nullptr) {
        charged = c;
        allocated_ += c;
        peak_allocated_ = std::max(peak_allocated_, allocated_);
        ++pool_allocs_;
      }
    }
    if (p == nullptr) {  // outside the pool's sizes, or no segment could be mapped
      p = c10::alloc_cpu(n);
      if (p == nullptr) return {nullptr, nullptr, &CachingCPUAllocator::deleter, c10::Device(c10::DeviceType::CPU)};
      std::lock_guard<std::mutex> lock(mu_);
      system_size_[p] = n;  // for the profiler's free event
      ++system_allocs_;
    }
    report(p, int64_t(charged));
    return {p, p, &CachingCPUAllocator::deleter, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &CachingCPUAllocator::deleter; }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  static void deleter(void* p);

  void release(void* p) {
    if (p == nullptr) return;
    int64_t charged = 0;
    bool system = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = blocks_.find(uintptr_t(p));
      if (it != blocks_.end() && !it->second.free) {
        charged = int64_t(it->second.size);
        allocated_ -= it->second.size;
        give_back(it);
      } else {  // not a pool block: it came from c10::alloc_cpu
        auto s = system_size_.find(p);
        TORCH_INTERNAL_ASSERT(s != system_size_.end(), "dtn_kernels.cpu_allocator: freeing an unknown pointer");
        charged = int64_t(s->second);
        system_size_.erase(s);
        system = true;
      }
    }
    if (system) c10::free_cpu(p);
    report(p, -charged);
  }

  // madvise(DONTNEED) the whole pages of every free block: their memory goes back to the system
  // (a later use faults fresh zero pages in). Returns the bytes given back.
  size_t empty_cache() {
    std::lock_guard<std::mutex> lock(mu_);
    size_t released = 0;
    for (const auto& [size, addr] : free_by_size_) {
      if (size == 0) continue;
      if (madvise(reinterpret_cast<void*>(addr), size, MADV_DONTNEED) == 0) released += size;
    }
    return released;
  }

  CachingAllocatorStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    CachingAllocatorStats s;
    s.allocated = int64_t(allocated_);
    s.peak_allocated = int64_t(peak_allocated_);
    s.mapped = int64_t(segments_.size() * kSegment);
    size_t free_bytes = 0, largest = 0;
    for (const auto& [size, addr] : free_by_size_) {
      free_bytes += size;
      largest = std::max(largest, size);
    }
    s.free = int64_t(free_bytes);
    s.largest_free = int64_t(largest);
    s.segments = int64_t(segments_.size());
    s.pool_allocs = int64_t(pool_allocs_);
    s.system_allocs = int64_t(system_allocs_);
    return s;
  }

  void reset_peak() {
    std::lock_guard<std::mutex> lock(mu_);
    peak_allocated_ = allocated_;
  }

  // Sanity of the block map (tests): blocks tile every segment, no two free neighbours, the
  // size index holds exactly the free blocks.
  bool check() {
    std::lock_guard<std::mutex> lock(mu_);
    size_t n_free = 0;
    for (size_t s = 0; s < segments_.size(); ++s) {
      uintptr_t at = segments_[s];
      bool prev_free = false;
      for (auto it = blocks_.lower_bound(at); it != blocks_.end() && it->first < segments_[s] + kSegment; ++it) {
        if (it->first != at || it->second.segment != int(s)) return false;
        if (it->second.free && prev_free) return false;
        if (it->second.free) {
          if (!free_by_size_.count({it->second.size, it->first})) return false;
          ++n_free;
        }
        prev_free = it->second.free;
        at += it->second.size;
      }
      if (at != segments_[s] + kSegment) return false;
    }
    return n_free == free_by_size_.size();
  }

  std::mutex mu_;

 private:
  using BlockIt = std::map<uintptr_t, Block>::iterator;

  void report(void* p, int64_t delta) {
    if (c10::memoryProfilingEnabled()) {
      size_t allocated, mapped;
      {
        std::lock_guard<std::mutex> lock(mu_);
        allocated = allocated_;
        mapped = segments_.size() * kSegment;
      }
      c10::reportMemoryUsageToProfiler(p, delta, allocated, mapped, c10::Device(c10::DeviceType::CPU));
    }
  }

  // The smallest free block of at least c bytes (a new segment if none), split to c.
  void* take(size_t c) {
    auto f = free_by_size_.lower_bound({c, 0});
    if (f == free_by_size_.end()) {
      if (!map_segment()) return nullptr;
      f = free_by_size_.lower_bound({c, 0});
    }
    const uintptr_t addr = f->second;
    free_by_size_.erase(f);
    Block& b = blocks_.at(addr);
    if (b.size > c) {  // the rest stays free, after the block
      blocks_.emplace(addr + c, Block{b.size - c, true, b.segment});
      free_by_size_.insert({b.size - c, addr + c});
      b.size = c;
    }
    b.free = false;
    return reinterpret_cast<void*>(addr);
  }

  // A freed block joins its free neighbours (within its segment) and the size index.
  void give_back(BlockIt it) {
    it->second.free = true;
    auto next = std::next(it);
    if (next != blocks_.end() && next->second.free && next->second.segment == it->second.segment) {
      free_by_size_.erase({next->second.size, next->first});
      it->second.size += next->second.size;
      blocks_.erase(next);
    }
    if (it != blocks_.begin()) {
      auto prev = std::prev(it);
      if (prev->second.free && prev->second.segment == it->second.segment) {
        free_by_size_.erase({prev->second.size, prev->first});
        prev->second.size += it->second.size;
        blocks_.erase(it);
        it = prev;
      }
    }
    free_by_size_.insert({it->second.size, it->first});
  }

  bool map_segment() {
    void* p = mmap(nullptr, kSegment, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    const uintptr_t addr = uintptr_t(p);
    segments_.push_back(addr);
    blocks_.emplace(addr, Block{kSegment, true, int(segments_.size()) - 1});
    free_by_size_.insert({kSegment, addr});
    return true;
  }

  std::map<uintptr_t, Block> blocks_;                    // every block of every segment, by address
  std::set<std::pair<size_t, uintptr_t>> free_by_size_;  // the free ones, by (size, address): best fit
  std::vector<uintptr_t> segments_;
  std::unordered_map<void*, size_t> system_size_;        // what came from c10::alloc_cpu, and its size
  size_t allocated_ = 0, peak_allocated_ = 0;
  uint64_t pool_allocs_ = 0, system_allocs_ = 0;
};

// Never destroyed: tensors freed during interpreter shutdown still find it.
CachingCPUAllocator& pool() {
  static auto* instance = [] {
    auto* a = new CachingCPUAllocator();
    pthread_atfork([] { pool().mu_.lock(); }, [] { pool().mu_.unlock(); }, [] { pool().mu_.unlock(); });
    return a;
  }();
  return *instance;
}

void CachingCPUAllocator::deleter(void* p) { pool().release(p); }

std::mutex g_switch;
c10::Allocator* g_previous = nullptr;  // the allocator the pool replaced
uint8_t g_priority = 0;                // SetCPUAllocator only replaces an allocator of lower or equal priority
bool g_enabled = false;

void set_cpu_allocator(c10::Allocator* a) {
  TORCH_CHECK(g_priority < 255, "dtn_kernels.cpu_allocator: switched too many times");
  c10::SetCPUAllocator(a, ++g_priority);
}

}  // namespace

bool caching_allocator_enable() {
  std::lock_guard<std::mutex> lock(g_switch);
  if (g_enabled) return false;
  CachingCPUAllocator& p = pool();
  c10::Allocator* current = c10::GetCPUAllocator();
  if (current != &p) g_previous = current;
  set_cpu_allocator(&p);
  g_enabled = true;
  return true;
}

bool caching_allocator_disable() {
  std::lock_guard<std::mutex> lock(g_switch);
  if (!g_enabled) return false;
  set_cpu_allocator(g_previous);  // tensors already allocated keep their deleter: they return to the pool
  g_enabled = false;
  return true;
}

bool caching_allocator_enabled() {
  std::lock_guard<std::mutex> lock(g_switch);
  return g_enabled;
}

int64_t caching_allocator_empty_cache() { return int64_t(pool().empty_cache()); }

CachingAllocatorStats caching_allocator_stats() { return pool().stats(); }

void caching_allocator_reset_peak() { pool().reset_peak(); }

bool caching_allocator_check() { return pool().check(); }

}  // namespace dtn
