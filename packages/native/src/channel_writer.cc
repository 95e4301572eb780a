// Channel writers: a thread per outgoing connection that writes its batches (encoded pieces with
// guest pages referenced in place, as writeRefs takes them) with writev, so the kernel's copy of
// every page runs beside the main thread instead of on it, and each channel of a multifd
// migration on a core of its own, as QEMU's channel threads do.
//
// The main thread queues a batch (its iovecs are taken at once, pointing into the batch's memory,
// which the caller keeps untouched until the batch is reported written) and goes on encoding the
// next. The thread writes on its own duplicate of the socket's descriptor, waiting in poll() when
// the socket is full, and reports finished batches (and the first error, after which it writes
// nothing more) through a uv_async handle: the callback runs on the event loop of the thread
// that opened the writer. Closing stops the thread (at once, even while it waits for room) and
// closes the duplicate; nothing is reported after close returns.

#include <node.h>
#include <uv.h>
#include <v8.h>

#include <cerrno>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include <poll.h>
#include <sys/uio.h>
#include <unistd.h>

#include "js_args.h"
#include "ref_iovecs.h"
#include "socket_thread.h"

namespace livemig {

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

struct Job {
  std::vector<struct iovec> iov;
};

class ChannelWriter {
 public:
  ChannelWriter(Isolate* isolate, int fd, int wake, Local<Function> onDone)
      : isolate_(isolate), fd_(fd), wake_(wake), context_(isolate, isolate->GetCurrentContext()), onDone_(isolate, onDone) {
    uv_async_init(node::GetCurrentEventLoop(isolate), &async_, [](uv_async_t* h) { static_cast<ChannelWriter*>(h->data)->Report(); });
    async_.data = this;
    // The loop is held open only while batches are queued (Push refs it, Report unrefs it).
    uv_unref(reinterpret_cast<uv_handle_t*>(&async_));
    thread_ = std::thread([this] { Run(); });
  }

  int id = 0;
  uv_async_t async_;

  // Queue a batch; returns its bytes.
  double Push(std::vector<struct iovec>&& iov) {
    double bytes = 0;
    for (const auto& v : iov) bytes += static_cast<double>(v.iov_len);
    {
      std::lock_guard<std::mutex> lock(mu_);
      jobs_.push_back(Job{std::move(iov)});
      queued_++;
    }
    if (queued_ - reported_ == 1) uv_ref(reinterpret_cast<uv_handle_t*>(&async_));
    cv_.notify_one();
    return bytes;
  }

  // Batches written so far (final once stopped).
  double Written() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<double>(done_);
  }

  // The thread stopped (at once, even while it waits for room) and joined; its descriptors closed.
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    WakeThread(wake_);
    if (thread_.joinable()) thread_.join();
    close(fd_);
    close(wake_);
  }

 private:

  void Run() {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !jobs_.empty(); });
        if (stop_) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      const int err = WriteAll(&job);
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (err == ECANCELED) return;
        if (err != 0) {
          error_ = err;
          stop_ = true;
        } else {
          done_++;
        }
      }
      uv_async_send(&async_);
      if (err != 0) return;
    }
  }

  // The whole job, waiting for room when the socket is full: 0, ECANCELED when stopped, or errno.
  int WriteAll(Job* job) {
    std::vector<struct iovec>& iov = job->iov;
    size_t next = 0;
    while (next < iov.size()) {
      const int n = static_cast<int>(std::min<size_t>(kIovMax, iov.size() - next));
      const ssize_t done = writev(fd_, iov.data() + next, n);
      if (done < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) return errno;
        struct pollfd waits[2] = {{fd_, POLLOUT, 0}, {wake_, POLLIN, 0}};
        if (poll(waits, 2, -1) < 0 && errno != EINTR) return errno;
        if (waits[1].revents != 0) return ECANCELED;
        continue;  // room, or an error the next writev reports
      }
      size_t left = static_cast<size_t>(done);
      while (next < iov.size() && left >= iov[next].iov_len) left -= iov[next++].iov_len;
      if (left > 0) {
        iov[next].iov_base = static_cast<char*>(iov[next].iov_base) + left;
        iov[next].iov_len -= left;
      }
    }
    return 0;
  }

  // On the loop's thread: tell JS how many batches are written so far, and the error if any.
  void Report() {
    uint64_t done;
    int error;
    {
      std::lock_guard<std::mutex> lock(mu_);
      done = done_;
      error = error_;
    }
    // The error goes to JS once (a report may come before the thread's last wake-up).
    if (errorReported_) return;
    if (done == reported_ && error == 0) return;
    errorReported_ = error != 0;
    reported_ = done;
    if (queued_ == reported_ || error != 0) uv_unref(reinterpret_cast<uv_handle_t*>(&async_));
    HandleScope scope(isolate_);
    Local<Context> context = context_.Get(isolate_);
    Context::Scope contextScope(context);
    Local<Value> argv[2] = {Number::New(isolate_, static_cast<double>(done)), v8::Undefined(isolate_)};
    if (error != 0) {
      const char* name = strerrorname_np(error);
      argv[1] = String::NewFromUtf8(isolate_, name != nullptr ? name : "EIO").ToLocalChecked();
    }
    node::MakeCallback(isolate_, context->Global(), onDone_.Get(isolate_), 2, argv, {0, 0});
  }

  Isolate* isolate_;
  const int fd_;
  const int wake_;
  Global<Context> context_;
  Global<Function> onDone_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> jobs_;
  bool stop_ = false;
  // Batches written (thread, under mu_) and the first error; queued, reported and errorReported:
  // the loop's thread only.
  uint64_t done_ = 0;
  int error_ = 0;
  uint64_t queued_ = 0;
  uint64_t reported_ = 0;
  bool errorReported_ = false;
};

ThreadRegistry<ChannelWriter>& writers = ThreadRegistry<ChannelWriter>::Of();

// openChannelWriter(fd, onDone(written: number, errno?: string)) → id. The writer writes on a
// duplicate of `fd` (close-on-exec); `onDone` gets the count of batches written since the
// writer opened, and an errno name once writing failed (nothing is written after that).
void OpenChannelWriter(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  int64_t fdArg;
  if (!IntArg(args, 0, &fdArg) || fdArg > INT_MAX || !args[1]->IsFunction()) return ThrowType(isolate, "openChannelWriter(fd: number, onDone: (written: number, errno?: string) => void)");
  int fd, wake;
  if (!OpenThreadDescriptors(isolate, static_cast<int>(fdArg), &fd, &wake)) return;
  ChannelWriter* w = new ChannelWriter(isolate, fd, wake, args[1].As<Function>());
  args.GetReturnValue().Set(Integer::New(isolate, writers.Open(isolate, w)));
}

// channelWriterPush(id, pieces, refs, refCount, sources) → the batch's bytes.
void ChannelWriterPush(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  int64_t id;
  if (!IntArg(args, 0, &id) || id > INT_MAX) return ThrowType(isolate, "channelWriterPush(id: number, pieces, refs, refCount, sources)");
  ChannelWriter* w = writers.Find(static_cast<int>(id));
  if (w == nullptr) return ThrowRange(isolate, "channelWriterPush: no open channel writer " + std::to_string(id));
  std::vector<struct iovec> iov;
  if (!RefIovecs(args, 1, "channelWriterPush", &iov)) return;
  args.GetReturnValue().Set(Number::New(isolate, w->Push(std::move(iov))));
}

// closeChannelWriter(id) → the batches it wrote in all: stop its thread (batches not yet written
// are dropped) and close its descriptor. Nothing is reported after it returns. Closing an id
// twice does nothing (and returns undefined).
void CloseChannelWriter(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  int64_t id;
  if (!IntArg(args, 0, &id) || id > INT_MAX) return ThrowType(isolate, "closeChannelWriter(id: number)");
  ChannelWriter* w = writers.Stop(isolate, static_cast<int>(id));
  if (w == nullptr) return;
  // Written before it stopped: batches whose report may not have come yet.
  args.GetReturnValue().Set(Number::New(isolate, w->Written()));
  ThreadRegistry<ChannelWriter>::Free(w);
}

}  // namespace

void InitChannelWriter(Local<Object> exports) {
  NODE_SET_METHOD(exports, "openChannelWriter", OpenChannelWriter);
  NODE_SET_METHOD(exports, "channelWriterPush", ChannelWriterPush);
  NODE_SET_METHOD(exports, "closeChannelWriter", CloseChannelWriter);
}

}  // namespace livemig
