// Multifd readers: a thread per incoming multifd channel (wire-format.md §7.6, QEMU's packet
// layout) that reads its packets and puts their pages straight into guest RAM, as QEMU's receive
// threads do, so the kernel's copy of every page runs beside the destination's main thread and
// each channel on a core of its own.
//
// The main thread reads the channel's init packet itself (and judges it), then hands the socket
// over at a packet boundary. The thread checks each packet header as @livemig/protocol's
// MultifdReceiver does, with the same messages (a header that fails is reported with its stream
// offset and nothing of its packet lands in RAM), zeroes the zero pages (QEMU 9.0+) that are not
// zero already, and reads the normal pages with readv into their places. It reports what it did
// (pages, SYNCs, bytes) through a uv_async handle on the opening thread's loop, at once after a
// SYNC packet (else at most every 10 ms), and how it ended: the peer's end at a packet boundary,
// or a failure with its message. Closing stops it at once (an eventfd wakes its poll) and closes
// its duplicate of the descriptor; nothing is reported after close returns.

#include <node.h>
#include <uv.h>
#include <v8.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "js_args.h"
#include "socket_thread.h"

namespace livemig {

using v8::Array;
using v8::ArrayBufferView;
using v8::Context;
using v8::Function;
using v8::FunctionCallbackInfo;
using v8::Global;
using v8::HandleScope;
using v8::Integer;
using v8::Isolate;
using v8::Local;
using v8::Number;
using v8::Object;
using v8::String;
using v8::Value;

namespace {

// The packet layout (protocol/src/multifd.ts).
constexpr uint32_t kMagic = 0x11223344;
constexpr uint32_t kVersion = 1;
constexpr uint32_t kFlagSync = 0x1;
constexpr uint32_t kCompressionMask = 0xe;
constexpr size_t kPageSize = 4096;
constexpr uint32_t kPagesPerPacket = 128;
// Reports between SYNCs: at most one per 10 ms (a packet a ~100 µs on loopback otherwise).
constexpr uint64_t kReportIntervalNs = 10'000'000;
constexpr size_t kLowWaterCap = 256 * 1024;
constexpr int kPollBoundMs = 100;
constexpr size_t kFixedLength = 320;
constexpr size_t kHeaderLength = kFixedLength + 8 * kPagesPerPacket;
constexpr size_t kBlockAt = 64;
constexpr size_t kBlockField = 256;

// How the reading ended (reported with the last counts).
enum End : int { kRunning = 0, kPeerEnded = 1, kFailed = 2 };

uint32_t Be32(const uint8_t* p) {
  return (static_cast<uint32_t>(p[0]) << 24) | (static_cast<uint32_t>(p[1]) << 16) | (static_cast<uint32_t>(p[2]) << 8) | p[3];
}

struct Block {
  std::string name;  // latin1 bytes, as the packet names it
  uint8_t* data;
  size_t length;
};

struct Failure {
  std::string message;
  double offset = 0;  // stream offset of the offending field
  bool lost = false;  // the connection failed or ended mid-packet (not the bytes' fault)
  std::string block;
};

class MultifdReader {
 public:
  MultifdReader(Isolate* isolate, int fd, int wake, double streamOffset, std::vector<Block>&& blocks, Local<Function> onReport)
      : isolate_(isolate),
        fd_(fd),
        wake_(wake),
        blocks_(std::move(blocks)),
        context_(isolate, isolate->GetCurrentContext()),
        onReport_(isolate, onReport),
        offset_(streamOffset) {
    uv_async_init(node::GetCurrentEventLoop(isolate), &async_, [](uv_async_t* h) { static_cast<MultifdReader*>(h->data)->Report(); });
    async_.data = this;
    // The socket keeps the loop alive while it matters; this handle never does on its own.
    uv_unref(reinterpret_cast<uv_handle_t*>(&async_));
    thread_ = std::thread([this] { Run(); });
  }

  int id = 0;
  uv_async_t async_;

  // The thread stopped (at once, even while it waits for bytes) and joined; its descriptors closed.
  void Stop() {
    stop_.store(true);
    WakeThread(wake_);
    if (thread_.joinable()) thread_.join();
    close(fd_);
    close(wake_);
  }

 private:

  // Fill [iov, iov + count) from the socket, waiting for bytes: 0 when full, 1 at EOF before
  // any byte when `eofOk`, -1 stopped, -2 failed (failure_ set).
  int ReadFully(struct iovec* iov, int count, bool eofOk) {
    bool any = false;
    int next = 0;
    while (next < count) {
      const ssize_t got = readv(fd_, iov + next, std::min(count - next, 1024));
      if (got < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
          Fail(std::string("read ") + (strerrorname_np(errno) != nullptr ? strerrorname_np(errno) : "EIO"), true);
          return -2;
        }
        SetLowWater(iov + next, count - next);
        struct pollfd waits[2] = {{fd_, POLLIN, 0}, {wake_, POLLIN, 0}};
        // Bounded: a read does not wait for the low-water mark, so should the kernel never wake
        // the poll for it (an old kernel's receive buffer full of small segments), the next
        // readv still takes what is there.
        if (poll(waits, 2, kPollBoundMs) < 0 && errno != EINTR) {
          Fail("poll failed", true);
          return -2;
        }
        if (waits[1].revents != 0 || stop_.load()) return -1;
        continue;
      }
      if (got == 0) {
        if (!any && eofOk) return 1;
        Fail("closed in the middle of a packet", true);
        return -2;
      }
      any = true;
      offset_ += static_cast<double>(got);
      lastByte_.store(uv_hrtime());
      size_t left = static_cast<size_t>(got);
      while (next < count && left >= iov[next].iov_len) left -= iov[next++].iov_len;
      if (left > 0) {
        iov[next].iov_base = static_cast<char*>(iov[next].iov_base) + left;
        iov[next].iov_len -= left;
      }
    }
    return 0;
  }

  // Wake this thread only once the socket holds what the read still needs (up to kLowWaterCap),
  // not at every segment: fewer wakeups and larger reads. The peer's end or an error wakes it
  // whatever is queued.
  void SetLowWater(const struct iovec* iov, int count) {
    size_t want = 0;
    for (int i = 0; i < count && want < kLowWaterCap; i++) want += iov[i].iov_len;
    const int lowat = static_cast<int>(std::min(want, kLowWaterCap));
    if (lowat == lowat_) return;
    if (setsockopt(fd_, SOL_SOCKET, SO_RCVLOWAT, &lowat, sizeof lowat) == 0) lowat_ = lowat;
  }

  void Fail(std::string message, bool lost, size_t at = 0, std::string block = std::string()) {
    std::lock_guard<std::mutex> lock(mu_);
    failure_.message = std::move(message);
    failure_.offset = headerAt_ + static_cast<double>(at);
    failure_.lost = lost;
    failure_.block = std::move(block);
    end_ = kFailed;
  }

  // A bad header: its message, at field `at` of the header (checked before a byte lands in RAM).
  bool Bad(size_t at, const std::string& message, const std::string& block = std::string()) {
    Fail(message, false, at, block);
    return false;
  }

  bool CheckHeader(uint32_t* flags, uint32_t* normal, uint32_t* zero, const Block** block) {
    const uint8_t* h = header_;
    char text[160];
    const uint32_t magic = Be32(h);
    if (magic != kMagic) {
      snprintf(text, sizeof text, "packet with magic 0x%08x (0x11223344 expected)", magic);
      return Bad(0, text);
    }
    const uint32_t version = Be32(h + 4);
    if (version != kVersion) return Bad(4, "packet version " + std::to_string(version) + " (1 expected)");
    *flags = Be32(h + 8);
    if ((*flags & kCompressionMask) != 0) {
      snprintf(text, sizeof text, "compressed packet (flags 0x%x); only multifd-compression \"none\" is supported", *flags);
      return Bad(8, text);
    }
    const uint32_t alloc = Be32(h + 12);
    if (alloc > kPagesPerPacket) return Bad(12, "packet with " + std::to_string(alloc) + " pages allocated (at most 128)");
    *normal = Be32(h + 16);
    if (*normal > alloc) return Bad(16, "packet with " + std::to_string(*normal) + " pages but " + std::to_string(alloc) + " allocated");
    *zero = Be32(h + 32);
    if (static_cast<uint64_t>(*normal) + *zero > alloc) {
      return Bad(32, "packet with " + std::to_string(*normal) + " normal and " + std::to_string(*zero) + " zero pages but " + std::to_string(alloc) + " allocated");
    }
    *block = nullptr;
    if (*normal + *zero == 0) return true;
    size_t end = kBlockAt;
    while (end < kBlockAt + kBlockField - 1 && h[end] != 0) end++;
    const std::string name(reinterpret_cast<const char*>(h + kBlockAt), end - kBlockAt);
    for (const Block& b : blocks_) {
      if (b.name == name) *block = &b;
    }
    if (*block == nullptr) return Bad(kBlockAt, "packet for unknown block \"" + name + "\"", name);
    for (uint32_t i = 0; i < *normal + *zero; i++) {
      const size_t at = kFixedLength + 8 * i;
      const uint32_t hi = Be32(h + at), lo = Be32(h + at + 4);
      const double offset = static_cast<double>(hi) * 4294967296.0 + lo;
      if (lo % kPageSize != 0 || offset > static_cast<double>((*block)->length) - static_cast<double>(kPageSize)) {
        snprintf(text, sizeof text, "page offset 0x%llx is not a page inside the block (%zu bytes)", static_cast<unsigned long long>(offset), (*block)->length);
        return Bad(at, text, name);
      }
      offsets_[i] = static_cast<size_t>(offset);
    }
    return true;
  }

  void Run() {
    std::vector<struct iovec> iov;
    iov.reserve(kPagesPerPacket);
    static const uint8_t zeroPage[kPageSize] = {};
    uint64_t lastReport = 0;
    for (;;) {
      headerAt_ = offset_;
      struct iovec h = {header_, kHeaderLength};
      const int r = ReadFully(&h, 1, true);
      if (r == -1) return;
      if (r == -2) break;
      if (r == 1) {
        std::lock_guard<std::mutex> lock(mu_);
        end_ = kPeerEnded;
        break;
      }
      uint32_t flags, normal, zero;
      const Block* block;
      if (!CheckHeader(&flags, &normal, &zero, &block)) break;
      for (uint32_t i = normal; i < normal + zero; i++) {
        uint8_t* page = block->data + offsets_[i];
        if (memcmp(page, zeroPage, kPageSize) != 0) memset(page, 0, kPageSize);
      }
      iov.clear();
      for (uint32_t i = 0; i < normal; i++) {
        uint8_t* page = block->data + offsets_[i];
        if (!iov.empty() && static_cast<uint8_t*>(iov.back().iov_base) + iov.back().iov_len == page) {
          iov.back().iov_len += kPageSize;
        } else {
          iov.push_back({page, kPageSize});
        }
      }
      if (!iov.empty()) {
        const int p = ReadFully(iov.data(), static_cast<int>(iov.size()), false);
        if (p == -1) return;
        if (p == -2) break;
      }
      bool sync = (flags & kFlagSync) != 0;
      {
        std::lock_guard<std::mutex> lock(mu_);
        pages_ += normal;
        zeroPages_ += zero;
        if (sync) syncs_++;
        bytes_ = offset_;
      }
      // Each report wakes the main thread: at once for a SYNC (the loader waits on it), else at
      // most one a kReportIntervalNs (the stall check's clock needs no finer).
      const uint64_t now = uv_hrtime();
      if (sync || now - lastReport >= kReportIntervalNs) {
        lastReport = now;
        uv_async_send(&async_);
      }
    }
    uv_async_send(&async_);
  }

  // On the loop's thread: the counts so far, and how it ended.
  void Report() {
    double pages, zeroPages, syncs, bytes;
    int end;
    Failure failure;
    {
      std::lock_guard<std::mutex> lock(mu_);
      pages = static_cast<double>(pages_);
      zeroPages = static_cast<double>(zeroPages_);
      syncs = static_cast<double>(syncs_);
      bytes = end_ == kRunning ? bytes_ : offset_;
      end = end_;
      if (end == kFailed && !reportedEnd_) failure = failure_;
      if (end != kRunning) {
        if (reportedEnd_) return;
        reportedEnd_ = true;
      }
    }
    HandleScope scope(isolate_);
    Local<Context> context = context_.Get(isolate_);
    Context::Scope contextScope(context);
    Local<Object> report = Object::New(isolate_);
    auto set = [&](const char* key, Local<Value> value) { report->Set(context, String::NewFromUtf8(isolate_, key).ToLocalChecked(), value).Check(); };
    set("pages", Number::New(isolate_, pages));
    set("zeroPages", Number::New(isolate_, zeroPages));
    set("syncs", Number::New(isolate_, syncs));
    set("bytes", Number::New(isolate_, bytes));
    set("end", Integer::New(isolate_, end));
    set("lastByteNs", Number::New(isolate_, static_cast<double>(lastByte_.load())));
    if (end == kFailed) {
      set("message", String::NewFromOneByte(isolate_, reinterpret_cast<const uint8_t*>(failure.message.data()), v8::NewStringType::kNormal, static_cast<int>(failure.message.size())).ToLocalChecked());
      set("offset", Number::New(isolate_, failure.offset));
      set("lost", v8::Boolean::New(isolate_, failure.lost));
      if (!failure.block.empty()) {
        set("block", String::NewFromOneByte(isolate_, reinterpret_cast<const uint8_t*>(failure.block.data()), v8::NewStringType::kNormal, static_cast<int>(failure.block.size())).ToLocalChecked());
      }
    }
    Local<Value> argv[1] = {report};
    node::MakeCallback(isolate_, context->Global(), onReport_.Get(isolate_), 1, argv, {0, 0});
  }

  Isolate* isolate_;
  const int fd_;
  const int wake_;
  const std::vector<Block> blocks_;
  Global<Context> context_;
  Global<Function> onReport_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  int lowat_ = 1;
  std::atomic<uint64_t> lastByte_{0};
  // The reading thread's own state.
  uint8_t header_[kHeaderLength];
  size_t offsets_[kPagesPerPacket];
  double offset_;
  double headerAt_ = 0;
  // Shared with the loop's thread, under mu_.
  std::mutex mu_;
  uint64_t pages_ = 0, zeroPages_ = 0, syncs_ = 0;
  double bytes_ = 0;
  int end_ = kRunning;
  Failure failure_;
  bool reportedEnd_ = false;
};

ThreadRegistry<MultifdReader>& readers = ThreadRegistry<MultifdReader>::Of();

// openMultifdReader(fd, streamOffset, names: string[], memories: ArrayBufferView[],
// onReport(report)) → id. Reads packets from a duplicate of `fd` (close-on-exec) into the named
// blocks' memory, from stream offset `streamOffset` (a packet boundary).
void OpenMultifdReader(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  Local<Context> context = isolate->GetCurrentContext();
  int64_t fdArg, streamOffset;
  if (!IntArg(args, 0, &fdArg) || fdArg > INT_MAX || !IntArg(args, 1, &streamOffset) || !args[2]->IsArray() || !args[3]->IsArray() || !args[4]->IsFunction()) {
    return ThrowType(isolate, "openMultifdReader(fd: number, streamOffset: number, names: string[], memories: ArrayBufferView[], onReport: (report) => void)");
  }
  Local<Array> names = args[2].As<Array>(), memories = args[3].As<Array>();
  if (names->Length() != memories->Length()) return ThrowRange(isolate, "openMultifdReader: a memory for each name");
  std::vector<Block> blocks;
  for (uint32_t i = 0; i < names->Length(); i++) {
    Local<Value> name, memory;
    if (!names->Get(context, i).ToLocal(&name) || !memories->Get(context, i).ToLocal(&memory)) return;
    if (!name->IsString() || !memory->IsArrayBufferView()) return ThrowType(isolate, "openMultifdReader: names are strings, memories ArrayBufferViews");
    Local<String> s = name.As<String>();
    std::string bytes(static_cast<size_t>(s->Length()), '\0');
    s->WriteOneByte(isolate, reinterpret_cast<uint8_t*>(bytes.data()), 0, s->Length());
    Local<ArrayBufferView> view = memory.As<ArrayBufferView>();
    blocks.push_back({bytes, static_cast<uint8_t*>(view->Buffer()->Data()) + view->ByteOffset(), view->ByteLength()});
  }
  int fd, wake;
  if (!OpenThreadDescriptors(isolate, static_cast<int>(fdArg), &fd, &wake)) return;
  MultifdReader* r = new MultifdReader(isolate, fd, wake, static_cast<double>(streamOffset), std::move(blocks), args[4].As<Function>());
  args.GetReturnValue().Set(Integer::New(isolate, readers.Open(isolate, r)));
}

// closeMultifdReader(id): stop its thread and close its descriptor; nothing is reported after.
void CloseMultifdReader(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  int64_t id;
  if (!IntArg(args, 0, &id) || id > INT_MAX) return ThrowType(isolate, "closeMultifdReader(id: number)");
  MultifdReader* r = readers.Stop(isolate, static_cast<int>(id));
  if (r != nullptr) ThreadRegistry<MultifdReader>::Free(r);
}

}  // namespace

void InitMultifdReader(Local<Object> exports) {
  NODE_SET_METHOD(exports, "openMultifdReader", OpenMultifdReader);
  NODE_SET_METHOD(exports, "closeMultifdReader", CloseMultifdReader);
}

}  // namespace livemig
