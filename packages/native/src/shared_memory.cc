// Guest RAM that survives exec (cpr-exec): a memfd mapped MAP_SHARED and handed to JS as a real
// SharedArrayBuffer (so workers share it as any other), plus the execve that replaces this
// process's image while keeping chosen descriptors open; and guest RAM that need not survive one,
// private and in transparent huge pages. Linux only.

#include <node.h>
#include <v8.h>

#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "js_args.h"

namespace livemig {
void InitSocketWrite(v8::Local<v8::Object> exports);
void InitChannelWriter(v8::Local<v8::Object> exports);
void InitMultifdReader(v8::Local<v8::Object> exports);
void InitPlacePages(v8::Local<v8::Object> exports);
}

namespace {

using v8::Array;
using v8::BackingStore;
using v8::Context;
using v8::FunctionCallbackInfo;
using v8::Integer;
using v8::Isolate;
using v8::Local;
using v8::Object;
using v8::SharedArrayBuffer;
using v8::String;
using v8::Value;

using livemig::IntArg;
using livemig::ThrowErrno;
using livemig::ThrowRange;
using livemig::ThrowType;

// The mapping lives as long as the last SharedArrayBuffer on it (in any thread).
void Unmap(void* data, size_t length, void*) {
  if (data != nullptr && length > 0) munmap(data, length);
}

// createMemfd(name, length) → fd. Close-on-exec until keepAcrossExec asks otherwise, so children
// spawned meanwhile never inherit guest RAM.
void CreateMemfd(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  int64_t length;
  if (!args[0]->IsString() || !IntArg(args, 1, &length)) return ThrowType(isolate, "createMemfd(name: string, length: number)");
  String::Utf8Value name(isolate, args[0]);
  int fd = memfd_create(*name, MFD_CLOEXEC);
  if (fd < 0) return ThrowErrno(isolate, "memfd_create", errno);
  if (ftruncate(fd, static_cast<off_t>(length)) != 0) {
    int err = errno;
    close(fd);
    return ThrowErrno(isolate, "ftruncate", err);
  }
  args.GetReturnValue().Set(Integer::New(isolate, fd));
}

// mapShared(fd, length) → SharedArrayBuffer over the first `length` bytes of the file.
void MapShared(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  int64_t fd, length;
  if (!IntArg(args, 0, &fd) || !IntArg(args, 1, &length) || length == 0) return ThrowType(isolate, "mapShared(fd: number, length: number > 0)");
  struct stat st;
  if (fstat(static_cast<int>(fd), &st) != 0) return ThrowErrno(isolate, "fstat", errno);
  if (st.st_size < length) {
    return ThrowRange(isolate, "fd " + std::to_string(fd) + " holds " + std::to_string(st.st_size) + " bytes, fewer than the " + std::to_string(length) + " to map");
  }
  void* data = mmap(nullptr, static_cast<size_t>(length), PROT_READ | PROT_WRITE, MAP_SHARED, static_cast<int>(fd), 0);
  if (data == MAP_FAILED) return ThrowErrno(isolate, "mmap", errno);
  std::unique_ptr<BackingStore> store = SharedArrayBuffer::NewBackingStore(data, static_cast<size_t>(length), Unmap, nullptr);
  args.GetReturnValue().Set(SharedArrayBuffer::New(isolate, std::move(store)));
}

// The size of a transparent huge page on x86-64: private RAM is aligned to it so that every
// 2 MiB of it can be one.
constexpr size_t kHugePageBytes = 2u << 20;

// mapPrivateRam(length, hugePages) → SharedArrayBuffer over fresh zeroed private anonymous
// memory, aligned to 2 MiB, advised MADV_HUGEPAGE when `hugePages` and MADV_NOHUGEPAGE when not
// (the advice is ignored where the kernel has no transparent huge pages). Shared by this
// process's threads as any SharedArrayBuffer, but never across exec or fork (that is
// createMemfd's). Huge pages make the kernel's copy of a page into RAM ~20-26 % cheaper here (no
// TLB miss every 4 KiB), and those copies are most of a migration.
void MapPrivateRam(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  int64_t length;
  if (!IntArg(args, 0, &length) || length == 0 || !args[1]->IsBoolean()) return ThrowType(isolate, "mapPrivateRam(length: number > 0, hugePages: boolean)");
  const size_t size = static_cast<size_t>(length);
  // Over-map by one huge page, then give back what lies outside the aligned range.
  void* raw = mmap(nullptr, size + kHugePageBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return ThrowErrno(isolate, "mmap", errno);
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePageBytes - 1) & ~(uintptr_t{kHugePageBytes} - 1);
  if (aligned > start) munmap(raw, aligned - start);
  const size_t mappedEnd = start + size + kHugePageBytes;
  const uintptr_t end = (aligned + size + 4095) & ~uintptr_t{4095};
  if (mappedEnd > end) munmap(reinterpret_cast<void*>(end), mappedEnd - end);
  void* data = reinterpret_cast<void*>(aligned);
  madvise(data, size, args[1].As<v8::Boolean>()->Value() ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  std::unique_ptr<BackingStore> store = SharedArrayBuffer::NewBackingStore(data, size, Unmap, nullptr);
  args.GetReturnValue().Set(SharedArrayBuffer::New(isolate, std::move(store)));
}

// closeFd(fd): a memfd whose RAM is no longer wanted (the mapping stays until its buffer is freed).
void CloseFd(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  int64_t fd;
  if (!IntArg(args, 0, &fd)) return ThrowType(isolate, "closeFd(fd: number)");
  close(static_cast<int>(fd));
}

bool SetCloexec(int fd, bool on) {
  int flags = fcntl(fd, F_GETFD);
  if (flags < 0) return false;
  return fcntl(fd, F_SETFD, on ? (flags | FD_CLOEXEC) : (flags & ~FD_CLOEXEC)) == 0;
}

// keepPrivate(fd): close-on-exec again (an inherited memfd, so children never get guest RAM).
void KeepPrivate(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  int64_t fd;
  if (!IntArg(args, 0, &fd)) return ThrowType(isolate, "keepPrivate(fd: number)");
  if (!SetCloexec(static_cast<int>(fd), true)) return ThrowErrno(isolate, "fcntl(F_SETFD)", errno);
}

std::vector<std::string> StringList(Isolate* isolate, Local<Value> value, bool* ok) {
  std::vector<std::string> out;
  *ok = value->IsArray();
  if (!*ok) return out;
  Local<Array> array = value.As<Array>();
  Local<Context> context = isolate->GetCurrentContext();
  for (uint32_t i = 0; i < array->Length(); i++) {
    Local<Value> item = array->Get(context, i).ToLocalChecked();
    if (!item->IsString()) {
      *ok = false;
      return out;
    }
    String::Utf8Value text(isolate, item);
    out.emplace_back(*text, text.length());
  }
  return out;
}

// execve(path, argv, env, keepFds): replace this process's image (same PID). The descriptors in
// keepFds stay open across it. Returns only on failure, by throwing, with everything as it was.
void Execve(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  bool argvOk, envOk;
  std::vector<std::string> argv = StringList(isolate, args[1], &argvOk);
  std::vector<std::string> env = StringList(isolate, args[2], &envOk);
  if (!args[0]->IsString() || !argvOk || !envOk || !args[3]->IsArray() || argv.empty()) {
    return ThrowType(isolate, "execve(path: string, argv: string[] (not empty), env: string[], keepFds: number[])");
  }
  String::Utf8Value path(isolate, args[0]);
  Local<Array> keep = args[3].As<Array>();
  Local<Context> context = isolate->GetCurrentContext();
  std::vector<int> fds;
  for (uint32_t i = 0; i < keep->Length(); i++) {
    Local<Value> item = keep->Get(context, i).ToLocalChecked();
    if (!item->IsInt32()) return ThrowType(isolate, "execve: keepFds must be integers");
    fds.push_back(item.As<Integer>()->Value());
  }
  std::vector<char*> argvp, envp;
  for (auto& a : argv) argvp.push_back(a.data());
  argvp.push_back(nullptr);
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);

  for (int fd : fds) {
    if (!SetCloexec(fd, false)) {
      int err = errno;
      for (int f : fds) SetCloexec(f, true);
      return ThrowErrno(isolate, "fcntl(F_SETFD)", err);
    }
  }
  // The new image starts with stdio as a fresh process would: open (Node marks 0–2
  // close-on-exec), blocking (libuv may have made our ends non-blocking); and with no signal
  // blocked in this thread (the mask survives exec).
  int stdioFlags[3], stdioFdFlags[3];
  for (int fd = 0; fd < 3; fd++) {
    stdioFdFlags[fd] = fcntl(fd, F_GETFD);
    if (stdioFdFlags[fd] >= 0) fcntl(fd, F_SETFD, stdioFdFlags[fd] & ~FD_CLOEXEC);
    stdioFlags[fd] = fcntl(fd, F_GETFL);
    if (stdioFlags[fd] >= 0 && (stdioFlags[fd] & O_NONBLOCK) != 0) fcntl(fd, F_SETFL, stdioFlags[fd] & ~O_NONBLOCK);
  }
  sigset_t none, previous;
  sigemptyset(&none);
  pthread_sigmask(SIG_SETMASK, &none, &previous);

  execve(*path, argvp.data(), envp.data());

  int err = errno;
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  for (int fd = 0; fd < 3; fd++) {
    if (stdioFlags[fd] >= 0) fcntl(fd, F_SETFL, stdioFlags[fd]);
    if (stdioFdFlags[fd] >= 0) fcntl(fd, F_SETFD, stdioFdFlags[fd]);
  }
  for (int fd : fds) SetCloexec(fd, true);
  std::string what = std::string("execve ") + *path;
  ThrowErrno(isolate, what.c_str(), err);
}

}  // namespace

NODE_MODULE_INIT(/* exports, module, context */) {
  NODE_SET_METHOD(exports, "createMemfd", CreateMemfd);
  NODE_SET_METHOD(exports, "mapShared", MapShared);
  NODE_SET_METHOD(exports, "mapPrivateRam", MapPrivateRam);
  NODE_SET_METHOD(exports, "closeFd", CloseFd);
  NODE_SET_METHOD(exports, "keepPrivate", KeepPrivate);
  NODE_SET_METHOD(exports, "execve", Execve);
  livemig::InitSocketWrite(exports);
  livemig::InitChannelWriter(exports);
  livemig::InitMultifdReader(exports);
  livemig::InitPlacePages(exports);
  (void)module;
}
