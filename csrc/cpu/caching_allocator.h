// The caching CPU allocator (csrc/cpu/caching_allocator.cpp): switches and statistics, bound to
// Python in csrc/dtn_ops.cpp and wrapped by dtn_kernels.cpu_allocator.
#pragma once

#include <cstdint>

namespace dtn {

struct CachingAllocatorStats {
  int64_t allocated = 0;       // bytes of live pool blocks (requests rounded up to 4 KiB)
  int64_t peak_allocated = 0;  // the most of it at once since the last reset_peak
  int64_t mapped = 0;          // virtual bytes of the segments (resident only where written)
  int64_t free = 0;            // bytes of free pool blocks
  int64_t largest_free = 0;
  int64_t segments = 0;
  int64_t pool_allocs = 0;     // allocations served by the pool, and by c10::alloc_cpu
  int64_t system_allocs = 0;
};

// enable: the pool serves its sizes (installed as torch's CPU allocator, once, the first time);
// disable: every request goes to the allocator it replaced. True if it changed, false when there was
// nothing to do. A pointer returns to the allocator that made it, whatever is switched in between.
bool caching_allocator_enable();
bool caching_allocator_disable();
bool caching_allocator_enabled();
int64_t caching_allocator_empty_cache();
CachingAllocatorStats caching_allocator_stats();
void caching_allocator_reset_peak();
bool caching_allocator_check();

}  // namespace dtn
