#!/usr/bin/env bash
# tools/gpu/prepare.sh — runs HERE (no GPU needed): builds strata with CUDA into build-gpu/ (or $BUILD_DIR) and
# assembles .devcarry/ (git-ignored) for the device machine: bin/strata (+ test_cuda_host),
# lib/ with every shared library the binary resolves that is neither glibc nor CUDA nor the
# C++ runtime (the device image is Ubuntu 24.04 + CUDA 13 and may lack libutf8proc,
# libmicrohttpd, libjansson, libonig, libedit, ...), and fixtures/ (the golden models).
# Then: the device call runs tools/gpu/device-run.sh with carry [".devcarry"].
set -euo pipefail
cd "$(dirname "$0")/../.."
t0=$(date +%s)
B=${BUILD_DIR:-build-gpu}   # BUILD_DIR=build-cuda reuses an existing CUDA build dir
cmake -S . -B "$B" -G Ninja -DSTRATA_CUDA=ON >/dev/null
cmake --build "$B" --target strata
cmake --build "$B" --target test_cuda_host || echo "prepare: test_cuda_host not built (cmocka missing?)"
rm -rf .devcarry
mkdir -p .devcarry/bin .devcarry/lib .devcarry/fixtures
cp $B/strata .devcarry/bin/
strip --strip-debug .devcarry/bin/strata
if [ -x $B/test_cuda_host ]; then cp $B/test_cuda_host .devcarry/bin/ && strip --strip-debug .devcarry/bin/test_cuda_host; fi
# shared libraries: everything ldd resolves except glibc, the C++ runtime and CUDA's own
for bin in $B/strata $B/test_cuda_host; do
  [ -x "$bin" ] || continue
  ldd "$bin" | awk '/=> \//{print $3}' | while read -r lib; do
    base=$(basename "$lib")
    case "$base" in
      libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libresolv.so*|libutil.so*) continue ;;
      libstdc++.so*|libgcc_s.so*) continue ;;
      libcuda.so*|libcudart.so*|libcublas*|libnvidia*|libnvrtc*|libnvJitLink*) continue ;;
    esac
    cp -Ln "$lib" .devcarry/lib/ 2>/dev/null || true
  done
done
cp -r tests/fixtures/models .devcarry/fixtures/
cp tools/gpu/device-run.sh tools/gpu/lib.sh .devcarry/
size_kb=$(du -sk .devcarry | cut -f1)
echo "prepare: .devcarry = $((size_kb / 1024)) MiB ($(ls .devcarry/lib | wc -l) libs: $(ls .devcarry/lib | tr '\n' ' '))"
if [ "$size_kb" -gt $((60 * 1024)) ]; then echo "prepare: .devcarry exceeds 60 MiB" >&2; exit 1; fi
echo "prepare: done in $(( $(date +%s) - t0 )) s. Device call: command 'bash tools/gpu/device-run.sh', carry [\".devcarry\"]"
