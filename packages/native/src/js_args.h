// What every function of the addon shares: errors thrown as Node's own carry them, and the check
// of a non-negative integer argument.

#pragma once

#include <node.h>
#include <v8.h>

#include <cstdint>
#include <cstring>
#include <string>

namespace livemig {

// An Error "what: <strerror>" with the errno name in `errno` (ENOENT, EACCES …), as Node's own.
inline void ThrowErrno(v8::Isolate* isolate, const char* what, int err) {
  std::string message = std::string(what) + ": " + strerror(err);
  v8::Local<v8::Value> error = v8::Exception::Error(v8::String::NewFromUtf8(isolate, message.c_str()).ToLocalChecked());
  v8::Local<v8::Context> context = isolate->GetCurrentContext();
  const char* name = strerrorname_np(err);
  if (name != nullptr) {
    error.As<v8::Object>()->Set(context, v8::String::NewFromUtf8Literal(isolate, "errno"), v8::String::NewFromUtf8(isolate, name).ToLocalChecked()).Check();
  }
  isolate->ThrowException(error);
}

inline void ThrowType(v8::Isolate* isolate, const std::string& message) {
  isolate->ThrowException(v8::Exception::TypeError(v8::String::NewFromUtf8(isolate, message.c_str()).ToLocalChecked()));
}

inline void ThrowRange(v8::Isolate* isolate, const std::string& message) {
  isolate->ThrowException(v8::Exception::RangeError(v8::String::NewFromUtf8(isolate, message.c_str()).ToLocalChecked()));
}

// Argument i as a non-negative integer a double holds exactly (NaN and past 2^53 - 1 refused).
inline bool IntArg(const v8::FunctionCallbackInfo<v8::Value>& args, int i, int64_t* out) {
  if (!args[i]->IsNumber()) return false;
  double d = args[i].As<v8::Number>()->Value();
  if (!(d >= 0) || d > 9007199254740991.0 || d != static_cast<double>(static_cast<int64_t>(d))) return false;
  *out = static_cast<int64_t>(d);
  return true;
}

}  // namespace livemig
