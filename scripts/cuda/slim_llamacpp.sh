#!/usr/bin/env bash
# Packs the llama.cpp that llama-cpp-python 0.3.36 bundles, slimmed to what a CUDA build of
# `llama-bench` needs (ggml core, CPU and CUDA backends, libllama, common, llama-bench), into
# .device/llamacpp.tar.xz: the whole source package (76.6 MB) does not fit beside this repository
# in a device call (64 MiB). On the GPU machine: scripts/cuda/build_llamacpp.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
src=${LLAMACPP_SDIST:-/work/bench/sdist/llama_cpp_python-0.3.36}
if [ ! -d "$src" ]; then
  mkdir -p /tmp/sdist && cd /tmp/sdist
  pip download --no-deps --no-binary :all: --no-build-isolation llama-cpp-python==0.3.36 -d . || true
  tar xzf llama_cpp_python-0.3.36.tar.gz && src=/tmp/sdist/llama_cpp_python-0.3.36 && cd - >/dev/null
fi
l=$src/vendor/llama.cpp
tmp=$(mktemp -d)
mkdir -p "$tmp/llama.cpp/ggml/src" "$tmp/llama.cpp/tools"
cp -r "$l"/{CMakeLists.txt,cmake,src,include,common,vendor,licenses,LICENSE,app} "$tmp/llama.cpp/"
cp -r "$l"/ggml/{CMakeLists.txt,cmake,include,.gitignore} "$tmp/llama.cpp/ggml/" 2>/dev/null || true
cd "$l/ggml/src"
for f in *; do
  case $f in
    ggml-cuda|ggml-cpu) cp -r "$f" "$tmp/llama.cpp/ggml/src/" ;;
    ggml-*) [ -f "$f" ] && cp "$f" "$tmp/llama.cpp/ggml/src/" ;;
    *) cp -r "$f" "$tmp/llama.cpp/ggml/src/" ;;
  esac
done
# Other backends' folders are referenced only when enabled; keep their CMakeLists out.
cp -r "$l/tools/llama-bench" "$tmp/llama.cpp/tools/"
echo 'add_subdirectory(llama-bench)' > "$tmp/llama.cpp/tools/CMakeLists.txt"
cd - >/dev/null
mkdir -p .device
tar -C "$tmp" -cJf .device/llamacpp.tar.xz llama.cpp
rm -rf "$tmp"
ls -la .device/llamacpp.tar.xz
