#!/usr/bin/env bash
# Build llama.cpp's own C++ server (`llama-server`), the peer most local users run (Ollama
# embeds the same code), from the llama.cpp sources that llama-cpp-python's sdist vendors,
# so both servers run the same kernels. Cached under bench/.venvs/llama-server (ignored by
# git). Its build uses the same CPU flags as llama-cpp-python's default build (native).
set -euo pipefail
cd "$(dirname "$0")"
version=$(../.venv/bin/python -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')
out=.venvs/llama-server
if [ -x "$out/bin/llama-server" ] && [ "$(cat "$out/VERSION" 2>/dev/null)" = "$version" ]; then
  echo "llama-server $version already built: $out/bin/llama-server"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
../.venv/bin/python -m pip download --quiet --no-deps --no-binary :all: \
  "llama-cpp-python==$version" -d "$work"
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON > "$work/cmake.log"
cmake --build "$work/build" --target llama-server -j "$(nproc)"
mkdir -p "$out/bin"
cp "$work/build/bin/llama-server" "$out/bin/"
echo "$version" > "$out/VERSION"
echo "built $out/bin/llama-server"
