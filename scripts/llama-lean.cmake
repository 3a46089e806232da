# Included by CMake right after llama.cpp's own project() call (scripts/setup passes it as
# CMAKE_PROJECT_llama.cpp_INCLUDE). llama-cpp-python forces LLAMA_BUILD_COMMON on, yet its
# wheel ships only libllama and the libggml libraries: the common library (chat parsers,
# JSON-schema grammars) and the vendored HTTP server code it pulls in were compiled and
# thrown away. A normal variable shadows the forced cache entry in llama.cpp's scope, and
# option() leaves it alone (policy CMP0077), so neither is built. The kernels are untouched.
set(LLAMA_BUILD_COMMON OFF)
