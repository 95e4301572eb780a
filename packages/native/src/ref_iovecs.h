// A batch of encoded pieces with guest pages referenced in between (BatchWriter.flushRefs) as
// the iovecs a writev takes: shared by writeRefs and the channel writer threads.

#pragma once

#include <node.h>
#include <v8.h>

#include <vector>

#include <sys/uio.h>

namespace livemig {

// Chunks per writev: Linux's IOV_MAX.
constexpr int kIovMax = 1024;

// Where a ref's bytes go and come from: 5 doubles each (piece, at, source, offset, length).
constexpr int kRefFields = 5;

// The batch in args[first .. first + 3] (pieces, refs, refCount, sources) as iovecs in stream
// order, every ref checked against its piece and source first. False with a JS exception thrown
// when the arguments are wrong. The iovecs point into the views' memory: valid while they live.
bool RefIovecs(const v8::FunctionCallbackInfo<v8::Value>& args, int first, const char* what, std::vector<struct iovec>* iov);

}  // namespace livemig
