// writeRefs: hand a batch to a non-blocking socket with writev, guest pages referenced in place
// between the header bytes encoded in slabs, as much as the kernel takes now, without Node's
// per-chunk write machinery (a Writable entry and a view object per chunk) or a copy of each
// page into a slab. The caller keeps everything else in Node (ordering, backpressure, errors): it
// calls this only when Node has nothing queued on the socket, and when the socket is full lets
// Node write the next chunk (waiting for room), then calls again from there (`skip`).

#include <node.h>
#include <v8.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include <sys/uio.h>
#include <unistd.h>

#include "js_args.h"
#include "ref_iovecs.h"

namespace livemig {

using v8::Array;
using v8::ArrayBufferView;
using v8::Context;
using v8::FunctionCallbackInfo;
using v8::Isolate;
using v8::Local;
using v8::Number;
using v8::Object;
using v8::Value;

bool RefIovecs(const FunctionCallbackInfo<Value>& args, int first, const char* what, std::vector<struct iovec>* iov) {
  Isolate* isolate = args.GetIsolate();
  Local<Context> context = isolate->GetCurrentContext();
  int64_t refCountArg;
  if (!args[first]->IsArray() || !args[first + 1]->IsFloat64Array() || !IntArg(args, first + 2, &refCountArg) || !args[first + 3]->IsArray()) {
    ThrowType(isolate, std::string(what) + ": pieces must be ArrayBufferView[], refs a Float64Array, refCount a count, sources ArrayBufferView[]");
    return false;
  }
  struct Span {
    char* data;
    size_t length;
  };
  auto spans = [&](Local<Array> list, std::vector<Span>* out) -> bool {
    out->reserve(list->Length());
    for (uint32_t i = 0; i < list->Length(); i++) {
      Local<Value> item;
      if (!list->Get(context, i).ToLocal(&item)) return false;
      if (!item->IsArrayBufferView()) {
        ThrowType(isolate, std::string(what) + ": item " + std::to_string(i) + " of a list is not an ArrayBufferView");
        return false;
      }
      Local<ArrayBufferView> view = item.As<ArrayBufferView>();
      out->push_back({static_cast<char*>(view->Buffer()->Data()) + view->ByteOffset(), view->ByteLength()});
    }
    return true;
  };
  std::vector<Span> pieces, sources;
  if (!spans(args[first].As<Array>(), &pieces) || !spans(args[first + 3].As<Array>(), &sources)) return false;
  Local<v8::Float64Array> refArray = args[first + 1].As<v8::Float64Array>();
  const size_t refCount = static_cast<size_t>(refCountArg);
  if (refCount * kRefFields > refArray->Length()) {
    ThrowRange(isolate, std::string(what) + ": refCount is more than refs holds");
    return false;
  }
  const double* refs = reinterpret_cast<const double*>(static_cast<char*>(refArray->Buffer()->Data()) + refArray->ByteOffset());
  iov->reserve(pieces.size() + 2 * refCount);
  size_t ref = 0;
  for (size_t p = 0; p < pieces.size(); p++) {
    size_t from = 0;
    for (; ref < refCount && refs[ref * kRefFields] == static_cast<double>(p); ref++) {
      const double* r = refs + ref * kRefFields;
      const double at = r[1], source = r[2], offset = r[3], length = r[4];
      if (!(at >= static_cast<double>(from)) || at > static_cast<double>(pieces[p].length) || !(source >= 0) || source >= static_cast<double>(sources.size()) || !(offset >= 0) ||
          !(length >= 0) || offset + length > static_cast<double>(sources[static_cast<size_t>(source)].length)) {
        ThrowRange(isolate, std::string(what) + ": ref " + std::to_string(ref) + " lies outside its piece or source, or out of order");
        return false;
      }
      const size_t atBytes = static_cast<size_t>(at);
      if (atBytes > from) iov->push_back({pieces[p].data + from, atBytes - from});
      if (length > 0) iov->push_back({sources[static_cast<size_t>(source)].data + static_cast<size_t>(offset), static_cast<size_t>(length)});
      from = atBytes;
    }
    if (pieces[p].length > from) iov->push_back({pieces[p].data + from, pieces[p].length - from});
  }
  if (ref != refCount) {
    ThrowRange(isolate, std::string(what) + ": ref " + std::to_string(ref) + " names a piece out of order or past the last");
    return false;
  }
  return true;
}

namespace {

// writeRefs(fd, pieces: ArrayBufferView[], refs: Float64Array, refCount, sources: ArrayBufferView[],
// skip) → bytes written. The stream written is each piece in turn, with each ref's bytes inserted
// into it: ref k is [piece, at, source, offset, length] = after byte `at` of pieces[piece], bytes
// [offset, offset + length) of sources[source] (refs in stream order), from its byte `skip` on
// (what an earlier call left). Writes until everything is written or the socket would block;
// other errors throw, with errno's name in `errno`.
void WriteRefs(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  int64_t fdArg, skipArg = 0;
  if (!IntArg(args, 0, &fdArg) || fdArg > INT_MAX || (args.Length() > 5 && !args[5]->IsUndefined() && !IntArg(args, 5, &skipArg))) {
    return ThrowType(isolate, "writeRefs(fd: number, pieces: ArrayBufferView[], refs: Float64Array, refCount: number, sources: ArrayBufferView[], skip?: number)");
  }
  const int fd = static_cast<int>(fdArg);
  std::vector<struct iovec> iov;
  if (!RefIovecs(args, 1, "writeRefs", &iov)) return;

  // Past what earlier calls wrote.
  size_t next = 0;
  size_t skip = static_cast<size_t>(skipArg);
  while (next < iov.size() && skip >= iov[next].iov_len) skip -= iov[next++].iov_len;
  if (next == iov.size() && skip > 0) return ThrowRange(isolate, "writeRefs: skip is past the batch's end");
  if (next < iov.size()) {
    iov[next].iov_base = static_cast<char*>(iov[next].iov_base) + skip;
    iov[next].iov_len -= skip;
  }

  double written = 0;
  while (next < iov.size()) {
    const int n = static_cast<int>(std::min<size_t>(kIovMax, iov.size() - next));
    size_t batch = 0;
    for (int k = 0; k < n; k++) batch += iov[next + k].iov_len;
    ssize_t done;
    do {
      done = writev(fd, iov.data() + next, n);
    } while (done < 0 && errno == EINTR);
    if (done < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      return ThrowErrno(isolate, "writev", errno);
    }
    written += static_cast<double>(done);
    if (static_cast<size_t>(done) < batch) break;  // the socket's buffer is full
    next += static_cast<size_t>(n);
  }
  args.GetReturnValue().Set(Number::New(isolate, written));
}

}  // namespace

void InitSocketWrite(Local<Object> exports) {
  NODE_SET_METHOD(exports, "writeRefs", WriteRefs);
}

}  // namespace livemig
