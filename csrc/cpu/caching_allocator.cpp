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
// first steps). Smaller and larger requests go to the allocator it replaced, torch's own (small ones
// are what glibc does well; large ones are long-lived: weights, tables).
//
// It is installed as torch's CPU allocator once (c10::SetCPUAllocator) and never uninstalled: "disable"
// makes it hand every request to the allocator it replaced, so a pointer allocated before or after, and
// freed through whichever allocator torch looks up at that moment (oneDNN frees through
// GetAllocator(CPU)->raw_deallocate), always reaches the right owner: a pointer that is not a pool block
// goes to the replaced allocator's raw deleter.
//
// One mutex guards the pool; a fork (DataLoader workers) takes it first, so the child's copy is
// consistent. Freed memory stays mapped: empty_cache() returns the pages of free blocks to the system.
#include <sys/mman.h>
#include <pthread.h>
#include <unistd.h>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <new>
#include <iterator>
#include <map>
#include <mutex>
#include <set>
#include <utility>
#include <vector>

#include "caching_allocator.h"

namespace dtn {
namespace {

constexpr size_t kGrain = 4096;                   // blocks are rounded up to this (and aligned to it)
constexpr size_t kMinBlock = size_t(64) << 10;    // smaller requests: the replaced allocator
constexpr size_t kMaxBlock = size_t(64) << 20;    // larger ones too (long-lived: tables, weights)
constexpr size_t kSegment = size_t(256) << 20;    // one mapping: virtual space, resident only where written
constexpr uint8_t kPriority = 1;                  // torch registers its own CPU allocator at 0

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }
size_t round_down(size_t n, size_t to) { return n / to * to; }

struct Block {
  size_t size;
  bool free;
  int segment;
};

class CachingCPUAllocator final : public c10::Allocator {
 public:
  // Called once, under g_switch, with torch's current CPU allocator.
  void set_previous(c10::Allocator* a) {
    TORCH_CHECK(a->raw_deleter() != nullptr, "dtn_kernels.cpu_allocator: the CPU allocator in place has no raw "
                "deleter, so pointers it made could not be handed back to it; not installing the pool");
    previous_ = a;
    previous_delete_ = a->raw_deleter();
  }

  void set_serving(bool on) { serving_.store(on); }
  bool serving() const { return serving_.load(); }

  c10::DataPtr allocate(size_t n) override {
    if (serving_.load(std::memory_order_relaxed) && n >= kMinBlock && n <= kMaxBlock) {
      void* p = nullptr;
      size_t c = round_up(n, kGrain), allocated = 0, mapped = 0;
      {
        std::lock_guard<std::mutex> lock(mu_);
        try {
          p = take(c);
        } catch (const std::bad_alloc&) {  // the pool's own bookkeeping: left as it was; the request goes on
          p = nullptr;
        }
        if (p != nullptr) {
          allocated_ += c;
          peak_allocated_ = std::max(peak_allocated_, allocated_);
          ++pool_allocs_;
          allocated = allocated_;
          mapped = segments_.size() * kSegment;
        }
      }
      if (p != nullptr) {
        report(p, int64_t(c), allocated, mapped);
        return {p, p, &CachingCPUAllocator::deleter, c10::Device(c10::DeviceType::CPU)};
      }
    }
    // outside the pool's sizes, the pool not serving, or no segment could be mapped: the replaced
    // allocator (which reports to the profiler itself); its pointer comes back to it through deleter
    void* p = previous_->raw_allocate(n);
    system_allocs_.fetch_add(1, std::memory_order_relaxed);
    return {p, p, &CachingCPUAllocator::deleter, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &CachingCPUAllocator::deleter; }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  static void deleter(void* p);

  void release(void* p) {
    if (p == nullptr) return;
    std::unique_lock<std::mutex> lock(mu_);
    auto it = blocks_.find(uintptr_t(p));
    if (it == blocks_.end()) {  // not a pool block: the replaced allocator's (made before, or outside the sizes)
      lock.unlock();
      previous_delete_(p);
      return;
    }
    TORCH_INTERNAL_ASSERT(!it->second.free, "dtn_kernels.cpu_allocator: a pool block freed twice");
    const size_t c = it->second.size;
    allocated_ -= c;
    const size_t allocated = allocated_, mapped = segments_.size() * kSegment;
    // reported before the block can be handed out again (the profiler sees the free first)
    report(p, -int64_t(c), allocated, mapped);
    give_back(it);
  }

  // madvise(DONTNEED) the whole pages inside every free block: their memory goes back to the system
  // (a later use faults fresh zero pages in). Returns the bytes given back.
  size_t empty_cache() {
    static const size_t page = size_t(sysconf(_SC_PAGESIZE));
    std::lock_guard<std::mutex> lock(mu_);
    size_t released = 0;
    for (const auto& [size, addr] : free_by_size_) {
      // only pages wholly inside the block (madvise rounds a length up: a page of a live neighbour must
      // not be advised away where the page is larger than the blocks' 4 KiB grain)
      const uintptr_t lo = round_up(addr, page), hi = round_down(addr + size, page);
      if (hi > lo && madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED) == 0) released += hi - lo;
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
    s.system_allocs = int64_t(system_allocs_.load());
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

  static void report(void* p, int64_t delta, size_t allocated, size_t mapped) {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(p, delta, allocated, mapped, c10::Device(c10::DeviceType::CPU));
    }
  }

  // The smallest free block of at least c bytes (a new segment if none), split to c. A bad_alloc of the
  // bookkeeping leaves the maps as they were.
  void* take(size_t c) {
    auto f = free_by_size_.lower_bound({c, 0});
    if (f == free_by_size_.end()) {
      if (!map_segment()) return nullptr;
      f = free_by_size_.lower_bound({c, 0});
    }
    const uintptr_t addr = f->second;
    Block& b = blocks_.at(addr);
    if (b.size > c) {  // the rest stays free, after the block
      auto rest = blocks_.emplace(addr + c, Block{b.size - c, true, b.segment}).first;
      try {
        free_by_size_.insert({b.size - c, addr + c});
      } catch (...) {
        blocks_.erase(rest);
        throw;
      }
      b.size = c;
    }
    free_by_size_.erase(f);
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
    try {
      free_by_size_.insert({it->second.size, it->first});
    } catch (const std::bad_alloc&) {
      // out of memory for one index node: the block stays free but unindexed (not handed out) until a
      // neighbour's free merges it back; nothing overlaps
    }
  }

  bool map_segment() {
    void* p = mmap(nullptr, kSegment, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    const uintptr_t addr = uintptr_t(p);
    try {
      segments_.push_back(addr);
      blocks_.emplace(addr, Block{kSegment, true, int(segments_.size()) - 1});
      free_by_size_.insert({kSegment, addr});
    } catch (...) {
      if (!segments_.empty() && segments_.back() == addr) segments_.pop_back();
      blocks_.erase(addr);
      munmap(p, kSegment);
      throw;
    }
    return true;
  }

  c10::Allocator* previous_ = nullptr;            // the allocator the pool replaced
  c10::DeleterFnPtr previous_delete_ = nullptr;   // its raw deleter: frees what did not come from the pool
  std::atomic<bool> serving_{false};
  std::map<uintptr_t, Block> blocks_;                    // every block of every segment, by address
  std::set<std::pair<size_t, uintptr_t>> free_by_size_;  // the free ones, by (size, address): best fit
  std::vector<uintptr_t> segments_;
  size_t allocated_ = 0, peak_allocated_ = 0;
  uint64_t pool_allocs_ = 0;
  std::atomic<uint64_t> system_allocs_{0};
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

std::mutex g_switch;  // enable / disable
bool g_installed = false;

}  // namespace

bool caching_allocator_enable() {
  std::lock_guard<std::mutex> lock(g_switch);
  CachingCPUAllocator& p = pool();
  if (p.serving()) return false;
  if (!g_installed) {  // once: torch's CPU allocator from now on (serving or passing every request through)
    c10::Allocator* current = c10::GetCPUAllocator();
    p.set_previous(current);
    c10::SetCPUAllocator(&p, kPriority);
    TORCH_CHECK(c10::GetCPUAllocator() == &p, "dtn_kernels.cpu_allocator: torch's CPU allocator was replaced at a "
                "priority above ", int(kPriority), " by another library; the pool cannot take its place");
    g_installed = true;
  }
  TORCH_CHECK(c10::GetCPUAllocator() == &p, "dtn_kernels.cpu_allocator: another library replaced torch's CPU "
              "allocator after the pool was installed; not enabling it");
  p.set_serving(true);
  return true;
}

bool caching_allocator_disable() {
  std::lock_guard<std::mutex> lock(g_switch);
  if (!pool().serving()) return false;
  pool().set_serving(false);  // every request to the replaced allocator; pool blocks still return to the pool
  return true;
}

bool caching_allocator_enabled() { return pool().serving(); }

int64_t caching_allocator_empty_cache() { return int64_t(pool().empty_cache()); }

CachingAllocatorStats caching_allocator_stats() { return pool().stats(); }

void caching_allocator_reset_peak() { pool().reset_peak(); }

bool caching_allocator_check() { return pool().check(); }

}  // namespace dtn
