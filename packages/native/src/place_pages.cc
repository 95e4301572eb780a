// placePages: the destination's run of CONTINUE PAGE records (be64 page offset | PAGE|CONTINUE,
// then the 4 KiB page) copied from a read buffer into the block's memory in one call, instead of
// a JS call (and V8's word-by-word copy into shared memory) per page. It takes records while each
// is whole before `to`, has exactly those flags, and names a page inside the block; it stops at
// the first that is not (the JS record loop reads that one, and refuses it if it must).
// placeClaimedPages does the same for postcopy, where each page is claimed first and marked
// received after (the guest runs meanwhile).

#include <node.h>
#include <v8.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "js_args.h"

namespace livemig {

using v8::ArrayBufferView;
using v8::FunctionCallbackInfo;
using v8::Integer;
using v8::Isolate;
using v8::Local;
using v8::Object;
using v8::Value;

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kRecord = 8 + kPage;
constexpr uint32_t kFlagsMask = kPage - 1;
// RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE.
constexpr uint32_t kContinuePage = 0x08 | 0x20;

uint32_t Be32(const uint8_t* p) {
  return (static_cast<uint32_t>(p[0]) << 24) | (static_cast<uint32_t>(p[1]) << 16) | (static_cast<uint32_t>(p[2]) << 8) | p[3];
}

// One page into guest RAM. With SSE2 the stores bypass the cache: the guest reads its pages only
// once it runs, long after, and a cached store into RAM not in the cache first reads the line
// from memory (what the copy cost here: measured below, see PlacePages).
void CopyPage(uint8_t* dst, const uint8_t* src) {
#if defined(__SSE2__)
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    for (size_t i = 0; i < kPage; i += 64) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
      const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
    }
    return;
  }
#endif
  std::memcpy(dst, src, kPage);
}

// Makes the streamed stores visible to other threads before the call returns.
void StoresDone() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

uint8_t* ViewData(Local<ArrayBufferView> v) {
  return static_cast<uint8_t*>(v->Buffer()->Data()) + v->ByteOffset();
}

// A run's arguments, shared by both placers: chunk, from, to, mem, written (args 0-4).
struct RunArgs {
  const uint8_t* chunk;
  size_t from;
  size_t to;
  uint8_t* mem;
  size_t memLength;
  bool hasWritten;
  uint32_t* written;  // may be null when given empty
  size_t writtenWords;
};

// Checks args 0-4 (the usage text is thrown as a TypeError, a bad range as a RangeError).
bool ReadRunArgs(const FunctionCallbackInfo<Value>& args, const char* usage, const char* name, RunArgs* out) {
  Isolate* isolate = args.GetIsolate();
  int64_t from, to;
  if (!args[0]->IsArrayBufferView() || !IntArg(args, 1, &from) || !IntArg(args, 2, &to) || !args[3]->IsArrayBufferView() ||
      !(args[4]->IsUndefined() || args[4]->IsUint32Array())) {
    ThrowType(isolate, usage);
    return false;
  }
  Local<ArrayBufferView> chunkView = args[0].As<ArrayBufferView>();
  Local<ArrayBufferView> memView = args[3].As<ArrayBufferView>();
  if (from > to || static_cast<size_t>(to) > chunkView->ByteLength()) {
    ThrowRange(isolate, std::string(name) + ": from and to must lie within the chunk, in order");
    return false;
  }
  *out = {ViewData(chunkView), static_cast<size_t>(from), static_cast<size_t>(to), ViewData(memView), memView->ByteLength(), false, nullptr, 0};
  if (args[4]->IsUint32Array()) {
    out->hasWritten = true;
    Local<v8::Uint32Array> w = args[4].As<v8::Uint32Array>();
    out->written = reinterpret_cast<uint32_t*>(ViewData(w));
    out->writtenWords = w->Length();
  }
  return true;
}

// Walks the run: each record whole before `to`, with exactly PAGE|CONTINUE, naming a page inside
// `mem` whose bitmap word is below `words` (and inside `written` when given), goes to
// place(offset, page, data), then gets its written bit. Returns the records taken.
template <typename Place>
int64_t WalkRun(const RunArgs& r, size_t words, Place place) {
  size_t at = r.from;
  int64_t taken = 0;
  while (at + kRecord <= r.to) {
    const uint32_t hi = Be32(r.chunk + at);
    const uint32_t lo = Be32(r.chunk + at + 4);
    if ((lo & kFlagsMask) != kContinuePage) break;
    const uint64_t offset = (static_cast<uint64_t>(hi) << 32) | (lo & ~kFlagsMask);
    if (offset > r.memLength || r.memLength - offset < kPage) break;
    const size_t page = static_cast<size_t>(offset / kPage);
    if (page / 32 >= words || (r.hasWritten && page / 32 >= r.writtenWords)) break;
    place(offset, page, r.chunk + at + 8);
    if (r.hasWritten) r.written[page / 32] |= 1u << (page % 32);
    at += kRecord;
    taken++;
  }
  return taken;
}

// placePages(chunk, from, to, mem, written?) → records placed (each 4104 bytes from `from`).
// `written` (a Uint32Array, one bit per page of the block) gets each placed page's bit.
void PlacePages(const FunctionCallbackInfo<Value>& args) {
  RunArgs r;
  if (!ReadRunArgs(args, "placePages(chunk: Uint8Array, from: number, to: number, mem: Uint8Array, written?: Uint32Array)", "placePages", &r)) return;
  const int64_t placed = WalkRun(r, SIZE_MAX, [&r](uint64_t offset, size_t, const uint8_t* data) { CopyPage(r.mem + offset, data); });
  StoresDone();
  args.GetReturnValue().Set(Integer::New(args.GetIsolate(), static_cast<int32_t>(placed)));
}

// The Int32Array argument i (a postcopy bitmap in shared memory, one bit per page), or null.
int32_t* BitmapArg(const FunctionCallbackInfo<Value>& args, int i, size_t* words) {
  if (!args[i]->IsInt32Array()) return nullptr;
  Local<v8::Int32Array> a = args[i].As<v8::Int32Array>();
  *words = a->Length();
  return reinterpret_cast<int32_t*>(ViewData(a));
}

// placeClaimedPages(chunk, from, to, mem, written, claimed, received) → records taken.
// Postcopy's run of CONTINUE PAGE records: each page is claimed (its bit set in `claimed` with an
// atomic or) and copied only if this call claimed it and it has not been received, then its
// `received` bit is set (atomic or, after the copy: a vCPU that sees the bit sees the page), as
// the JS record loop's acceptPage and pagePlaced do with Atomics. A page another thread claimed is
// skipped (that thread places it). Plain stores, not streamed: a vCPU in postcopy touches pages
// right after they arrive. `written` as in placePages, for every record taken.
void PlaceClaimedPages(const FunctionCallbackInfo<Value>& args) {
  const char* usage =
      "placeClaimedPages(chunk: Uint8Array, from: number, to: number, mem: Uint8Array, written: Uint32Array | undefined, claimed: Int32Array, received: Int32Array)";
  if (!args[5]->IsInt32Array() || !args[6]->IsInt32Array()) return ThrowType(args.GetIsolate(), usage);
  RunArgs r;
  if (!ReadRunArgs(args, usage, "placeClaimedPages", &r)) return;
  size_t claimedWords = 0, receivedWords = 0;
  int32_t* claimed = BitmapArg(args, 5, &claimedWords);
  int32_t* received = BitmapArg(args, 6, &receivedWords);
  const int64_t taken = WalkRun(r, std::min(claimedWords, receivedWords), [&](uint64_t offset, size_t page, const uint8_t* data) {
    const size_t word = page / 32;
    const int32_t bit = static_cast<int32_t>(1u << (page % 32));
    if ((__atomic_fetch_or(claimed + word, bit, __ATOMIC_SEQ_CST) & bit) != 0 || (__atomic_load_n(received + word, __ATOMIC_SEQ_CST) & bit) != 0) return;
    std::memcpy(r.mem + offset, data, kPage);
    __atomic_fetch_or(received + word, bit, __ATOMIC_SEQ_CST);
  });
  args.GetReturnValue().Set(Integer::New(args.GetIsolate(), static_cast<int32_t>(taken)));
}

}  // namespace

void InitPlacePages(Local<Object> exports) {
  NODE_SET_METHOD(exports, "placePages", PlacePages);
  NODE_SET_METHOD(exports, "placeClaimedPages", PlaceClaimedPages);
}

}  // namespace livemig
