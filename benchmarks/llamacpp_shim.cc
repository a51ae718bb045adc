// __cxa_call_terminate for hosts whose libstdc++ predates GCC 14.
//
// GCC 14 code calls this libstdc++ entry point when an exception escapes a noexcept function;
// older runtimes (Debian 12 ships GCC 12's) lack it, so a llama.cpp module prebuilt with GCC 14
// (llama-cpp-cffi's _llama_cpp_cpu) fails to import with "undefined symbol: __cxa_call_terminate".
// This does what the GCC 14 runtime does: begin the catch, then std::terminate.
//
//   g++ -O2 -shared -fPIC -o libcxa_shim.so benchmarks/llamacpp_shim.cc
//   FACTORLM_LLAMA_CPP_PRELOAD=$PWD/libcxa_shim.so python benchmarks/bench_offline.py ... --gguf sample
#include <cxxabi.h>
#include <exception>

extern "C" void __cxa_call_terminate(void* exception) noexcept {
  if (exception) __cxxabiv1::__cxa_begin_catch(exception);
  std::terminate();
}
