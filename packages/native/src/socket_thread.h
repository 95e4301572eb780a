// What the addon's socket threads (channel_writer.cc, multifd_reader.cc) share: the descriptors
// a thread works on (its own close-on-exec duplicate of the socket's, so the socket outlives
// Node's close until the thread stops, and a non-blocking eventfd that wakes its poll() when it
// must stop), the registry of open threads by id, and their end: stopped and joined on the
// thread that opened them, freed once libuv has let go of their async handle.

#pragma once

#include <node.h>
#include <uv.h>
#include <v8.h>

#include <cerrno>
#include <cstdint>
#include <mutex>
#include <unordered_map>

#include <fcntl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "js_args.h"

namespace livemig {

// A close-on-exec duplicate of `fd` and a fresh eventfd: false, with nothing left open and a JS
// exception thrown, when either cannot be had.
inline bool OpenThreadDescriptors(v8::Isolate* isolate, int fd, int* dup, int* wake) {
  *dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (*dup < 0) {
    ThrowErrno(isolate, "fcntl(F_DUPFD_CLOEXEC)", errno);
    return false;
  }
  *wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (*wake < 0) {
    const int err = errno;
    close(*dup);
    ThrowErrno(isolate, "eventfd", err);
    return false;
  }
  return true;
}

// Make a thread's poll() on `wake` return (one write cannot overflow the counter).
inline void WakeThread(int wake) {
  const uint64_t one = 1;
  ssize_t ignored = write(wake, &one, sizeof one);
  (void)ignored;
}

// Open threads of type T by id (ids are never reused), one registry per type; each is used from
// the thread that opened it. T has `int id`, `uv_async_t async_` (its data T itself) and
// `void Stop()`, which stops and joins its thread and closes its descriptors.
template <typename T>
class ThreadRegistry {
 public:
  static ThreadRegistry& Of() {
    static ThreadRegistry registry;
    return registry;
  }

  // Registered, and ended with its environment if still open then; returns its id.
  int Open(v8::Isolate* isolate, T* t) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      t->id = next_++;
      open_[t->id] = t;
    }
    node::AddEnvironmentCleanupHook(isolate, CleanupHook, t);
    return t->id;
  }

  T* Find(int id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = open_.find(id);
    return it == open_.end() ? nullptr : it->second;
  }

  // Out of the registry and stopped (its thread joined): what it did is final, and may be read
  // until Free. nullptr when no such id is open (closing twice does nothing).
  T* Stop(v8::Isolate* isolate, int id) {
    T* t = Take(id);
    if (t == nullptr) return nullptr;
    node::RemoveEnvironmentCleanupHook(isolate, CleanupHook, t);
    t->Stop();
    return t;
  }

  // Freed once libuv has closed its handle; nothing is reported after.
  static void Free(T* t) {
    uv_close(reinterpret_cast<uv_handle_t*>(&t->async_), [](uv_handle_t* h) { delete static_cast<T*>(h->data); });
  }

 private:
  T* Take(int id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = open_.find(id);
    if (it == open_.end()) return nullptr;
    T* t = it->second;
    open_.erase(it);
    return t;
  }

  static void CleanupHook(void* arg) {
    T* t = static_cast<T*>(arg);
    if (Of().Take(t->id) != t) return;
    t->Stop();
    Free(t);
  }

  std::mutex mu_;
  std::unordered_map<int, T*> open_;
  int next_ = 1;
};

}  // namespace livemig
