#!/usr/bin/env bash
# The CUDA toolchain from PyPI wheels, enough to *compile* lopper's `cuda` feature (candle's
# CUDA backend and its kernels) on a machine without a GPU (issue 21). Source it:
#
#     source bench/cuda_env.sh            # creates target/cuda-venv once, then exports
#     cargo build --release --features cuda --target-dir target/cuda
#
# Exports PATH (nvcc), CUDA_ROOT / CUDA_PATH / CUDA_HOME (headers), LD_LIBRARY_PATH (runtime)
# and CUDA_COMPUTE_CAP (the architecture candle's kernels are built for; default 90 = sm_90,
# override before sourcing). The wheels are pinned; nothing is installed system-wide.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CUDA_VENV:-$HERE/target/cuda-venv}"
PY="${PYTHON:-python3}"
# CUDA 13.4 (the newest cudarc 0.19 knows): the CUDA 12 nvcc wheels hold only ptxas; the
# CUDA 13 ones ship nvcc itself, in one toolkit-shaped folder (nvidia/cu13).
PKGS="nvidia-cuda-nvcc==13.4.92 nvidia-cuda-runtime==13.4.92 nvidia-cuda-crt==13.4.92 nvidia-nvvm==13.4.92
  nvidia-cuda-cccl==13.3.5.0.6 nvidia-cuda-nvrtc==13.4.92 nvidia-cublas==13.4.3.11 nvidia-curand==10.4.4.72"
# Installed once per package list (a marker records it, so a failed or older install is
# redone).
if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$PKGS" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q $PKGS
  echo "$PKGS" > "$VENV/.installed"
fi
ROOT="$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')"
# Unversioned library names the linker looks for.
for l in "$ROOT"/lib/lib*.so.*; do
  base="${l%%.so.*}.so"; [ -e "$base" ] || ln -sf "$l" "$base"
done
[ -e "$ROOT/lib64" ] || ln -sfn "$ROOT/lib" "$ROOT/lib64"
# The driver (libcuda) comes with the GPU's driver, not with any wheel; linking needs its
# symbols, so a link-time stub is built from the names candle's cudarc binds (what the CUDA
# toolkit's lib/stubs/libcuda.so is). Its soname is the driver's, so a binary built here
# loads the real driver on a GPU machine; the stub is never on the runtime library path.
if [ ! -e "$ROOT/lib/stubs/libcuda.so" ]; then
  (cd "$HERE" && cargo fetch -q)
  CUDARC="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -1)"
  mkdir -p "$ROOT/lib/stubs"
  grep -ohE "^\s+fn cu[A-Za-z0-9_]+\(" "$CUDARC"/src/driver/sys/mod.rs \
    | grep -oE "cu[A-Za-z0-9_]+" | sort -u | sed 's/.*/int &(void) { return 999; }/' \
    > "$ROOT/lib/stubs/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib/stubs/libcuda.so" \
    "$ROOT/lib/stubs/libcuda_stub.c"
fi
set +u
export CUDA_ROOT="$ROOT" CUDA_PATH="$ROOT" CUDA_HOME="$ROOT"
export PATH="$ROOT/bin:$PATH"
export LD_LIBRARY_PATH="$ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
set +e +o pipefail
echo "cuda_env: nvcc $(nvcc --version | tail -1), compute cap $CUDA_COMPUTE_CAP, root $ROOT" >&2
