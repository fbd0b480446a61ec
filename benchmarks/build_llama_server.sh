#!/usr/bin/env bash
# Builds llama.cpp's OpenAI-compatible server (llama-server) for benchmarks/llama_server.py,
# from the llama.cpp sources inside llama-cpp-python's sdist on PyPI (pinned below; no other
# download), into .cache/llama.cpp/. Idempotent: prints the binary's path, building it only once.
# About 6 minutes on 2 cores; needs cmake, a C++ compiler and the .venv that `make` creates.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.3.36  # llama-cpp-python; its vendor/llama.cpp is llama.cpp's commit 0c1e570
root=.cache/llama.cpp
source_dir="$root/llama_cpp_python-$version/vendor/llama.cpp"
binary="$source_dir/build/bin/llama-server"
if [[ ! -x $binary ]]; then
  mkdir -p "$root"
  if [[ ! -d $source_dir ]]; then
    .venv/bin/pip download --quiet --no-deps --no-binary :all: --dest "$root" \
      "llama-cpp-python==$version"
    tar -xzf "$root/llama_cpp_python-$version.tar.gz" -C "$root"
  fi
  cmake -S "$source_dir" -B "$source_dir/build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
  cmake --build "$source_dir/build" -j "$(nproc)" --target llama-server llama-quantize >&2
fi
realpath "$binary"
