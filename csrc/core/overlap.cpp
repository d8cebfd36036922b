// Overlap detection between destination and source byte ranges, in one sort and one sweep.
#include <algorithm>

#include "weightsync/core.h"

namespace weightsync::core {

std::optional<std::pair<ByteRange, ByteRange>> find_overlap(std::vector<ByteRange> ranges,
                                                           int written_group) {
  ranges.erase(std::remove_if(ranges.begin(), ranges.end(),
                              [](const ByteRange& r) { return r.end <= r.begin; }),
               ranges.end());
  std::sort(ranges.begin(), ranges.end(), [](const ByteRange& a, const ByteRange& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  // The earlier range reaching furthest right is the one any later range would hit first.
  const ByteRange* furthest_any = nullptr;
  const ByteRange* furthest_written = nullptr;
  for (const ByteRange& r : ranges) {
    const bool written = r.group == written_group;
    const ByteRange* rival = written ? furthest_any : furthest_written;
    if (rival != nullptr && rival->end > r.begin) return std::make_pair(*rival, r);
    if (furthest_any == nullptr || r.end > furthest_any->end) furthest_any = &r;
    if (written && (furthest_written == nullptr || r.end > furthest_written->end)) {
      furthest_written = &r;
    }
  }
  return std::nullopt;
}

}  // namespace weightsync::core
