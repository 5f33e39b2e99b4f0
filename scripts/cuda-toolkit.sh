#!/usr/bin/env bash
# Assembles NVIDIA's CUDA 13.0 toolkit (nvcc, headers, cuBLAS, cuRAND, NVRTC, cuDNN) from its
# PyPI wheels, without root and without a GPU, so that `--features cuda,cudnn` builds and links
# on any Linux x86-64 machine (CI included). The driver library (libcuda.so.1) comes with the
# GPU's driver, not with the toolkit: a link-only stub stands in for it at build time (every
# function returns CUDA_ERROR_NO_DEVICE); the real one is loaded where the binary runs.
#
# Usage:   eval "$(scripts/cuda-toolkit.sh [DIR])"    # DIR defaults to target/cuda-toolkit
#          cargo build --release --features cuda,cudnn
# A DIR assembled earlier with the same wheel versions is reused (CI caches it). Needs python3
# with venv, a C compiler and the crates fetched (`cargo fetch`, for cudarc's symbol list).
# Keep nvcc at 13.0: the GPU machines' driver (580, CUDA 13.0) refuses PTX from newer nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=$(mkdir -p "${1:-target/cuda-toolkit}" && cd "${1:-target/cuda-toolkit}" && pwd)
WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.1.2.11 nvidia-curand==10.4.0.35 nvidia-cudnn-cu13==9.28.1.4)
T="$DIR/toolkit"
STAMP="$DIR/complete"
want="${WHEELS[*]}"

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  rm -rf "$DIR/venv" "$T" "$STAMP"
  python3 -m venv "$DIR/venv" >&2
  "$DIR/venv/bin/pip" install -q --no-cache-dir "${WHEELS[@]}" >&2
  SP=$("$DIR/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  CU="$SP/nvidia/cu13"
  mkdir -p "$T/lib64/stubs"
  for d in bin include nvvm; do ln -sfn "$CU/$d" "$T/$d"; done
  # unversioned names for the linker, next to the versioned ones the loader wants
  for lib in cudart cublas cublasLt curand nvrtc; do
    f=$(ls "$CU/lib/lib$lib.so."* | sort | head -n1)
    ln -sf "$f" "$T/lib64/lib$lib.so"
    ln -sf "$f" "$T/lib64/$(basename "$f")"
  done
  for f in "$SP"/nvidia/cudnn/lib/libcudnn*.so.*; do
    ln -sf "$f" "$T/lib64/$(basename "$f")"
  done
  ln -sf "$(ls "$SP"/nvidia/cudnn/lib/libcudnn.so.* | head -n1)" "$T/lib64/libcudnn.so"
  ln -sfn "$SP/nvidia/cudnn/include" "$T/include-cudnn"
  for h in "$SP"/nvidia/cudnn/include/*.h; do ln -sf "$h" "$T/include/$(basename "$h")" 2>/dev/null || true; done

  # libcuda.so.1 stub: every driver function cudarc (the version in Cargo.lock) can call
  ver=$(awk '/^name = "cudarc"$/ {getline; gsub(/"/, "", $3); print $3}' Cargo.lock)
  sys=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path "*/cudarc-$ver/src/driver/sys/mod.rs" | head -n1)
  [ -n "$sys" ] || { echo "cudarc $ver not fetched: run cargo fetch first" >&2; exit 1; }
  grep -oE 'load::<_F>\("cu[A-Za-z0-9_]+"\)' "$sys" | sed -E 's/.*"(cu[A-Za-z0-9_]+)".*/int \1(void) { return 100; }/' \
    | sort -u > "$DIR/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$T/lib64/stubs/libcuda.so" "$DIR/cuda_stub.c"
  "$T/bin/nvcc" --version >&2
  echo "$want" > "$STAMP"
fi

cat <<EOF
export CUDA_HOME="$T" CUDA_PATH="$T" CUDA_ROOT="$T" NVCC="$T/bin/nvcc"
export PATH="$T/bin:\$PATH" CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export CUDNN_LIB="$T/lib64" CUDNN_INCLUDE_DIR="$T/include"
EOF
