// The software prefetcher of the CPU paged_attention kernel (part of paged_attention.cpp).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#ifndef STOPKIT_ISA
#error "STOPKIT_ISA must name the instruction-set build (generic, avx2, avx512, avx512bf16, amx)"
#endif

namespace stopkit::cpu::STOPKIT_ISA {
namespace {

// Software prefetches of the pages ahead (scattered, so the hardware prefetcher cannot guess
// them), issued a few lines per step of work: a page or a block of pages at once would fill the
// core's line fill buffers and stall it until the lines arrive, instead of overlapping them with
// the work.
class Prefetcher {
 public:
  void add(const void* p, int64_t bytes) {
    const int64_t lines = (bytes + 63) / 64;
    const char* at = static_cast<const char*>(p);
    ranges_.push_back({at, at + lines * 64});
    left_ += lines;
  }
  // What was added since the last flush goes out over the next `steps` steps.
  void spread(int64_t steps) { per_step_ = (left_ + steps - 1) / std::max<int64_t>(1, steps); }
  // Always inlined: called per key next to 16-24 vector accumulators, which a call would spill
  // (every vector register is caller-saved), and compilers do not always inline it by themselves.
  __attribute__((always_inline)) void step() {
    for (int64_t i = 0; i < per_step_; ++i) {
      if (at_ == end_ && !next()) return;
      __builtin_prefetch(at_, 0, 1);
      at_ += 64;
    }
  }
  void flush() {
    do {
      for (; at_ < end_; at_ += 64) __builtin_prefetch(at_, 0, 1);
    } while (next());
    ranges_.clear();
    front_ = 0;
    left_ = 0;
  }

 private:
  struct Range {
    const char *at, *end;
  };
  bool next() {
    if (front_ == ranges_.size()) return false;
    at_ = ranges_[front_].at;
    end_ = ranges_[front_].end;
    ++front_;
    return true;
  }
  std::vector<Range> ranges_;
  size_t front_ = 0;
  const char *at_ = nullptr, *end_ = nullptr;
  int64_t left_ = 0, per_step_ = 0;
};

}  // namespace
}  // namespace stopkit::cpu::STOPKIT_ISA
