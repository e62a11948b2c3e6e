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
# symbols, so a stub is built from the names candle's cudarc binds (what the CUDA toolkit's
# lib/stubs/libcuda.so is). Its soname is the driver's, so a binary built here loads the
# real driver on a GPU machine. Every stub entry point answers CUDA_ERROR_NO_DEVICE (100)
# and the two error-string calls answer properly, so on a machine without a driver the
# CUDA binary starts, runs on the CPU, and `--device cuda` fails with a clear message
# instead of the loader refusing the binary. The stub goes on the runtime library path
# only where no real driver is installed.
STUB_VERSION=2
if [ "$(cat "$ROOT/lib/stubs/.version" 2>/dev/null)" != "$STUB_VERSION" ]; then
  (cd "$HERE" && cargo fetch -q)
  CUDARC="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -1)"
  mkdir -p "$ROOT/lib/stubs"
  {
    echo 'int cuGetErrorString(int e, const char **s) { *s = e == 100 ? "no CUDA-capable device: this machine has no NVIDIA driver (lopper'"'"'s stub libcuda answered)" : "CUDA error (stub driver)"; return 0; }'
    echo 'int cuGetErrorName(int e, const char **s) { *s = e == 100 ? "CUDA_ERROR_NO_DEVICE" : "CUDA_ERROR_UNKNOWN"; return 0; }'
    grep -ohE "^\s+fn cu[A-Za-z0-9_]+\(" "$CUDARC"/src/driver/sys/mod.rs \
      | grep -oE "cu[A-Za-z0-9_]+" | sort -u | grep -vxE "cuGetErrorString|cuGetErrorName" \
      | sed 's/.*/int &(void) { return 100; }/'
  } > "$ROOT/lib/stubs/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib/stubs/libcuda.so" \
    "$ROOT/lib/stubs/libcuda_stub.c"
  ln -sf libcuda.so "$ROOT/lib/stubs/libcuda.so.1"
  echo "$STUB_VERSION" > "$ROOT/lib/stubs/.version"
fi
set +u
export CUDA_ROOT="$ROOT" CUDA_PATH="$ROOT" CUDA_HOME="$ROOT"
export PATH="$ROOT/bin:$PATH"
export LD_LIBRARY_PATH="$ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Link time always finds the stub; run time only where the real driver is absent.
export LIBRARY_PATH="$ROOT/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
if ! ldconfig -p 2>/dev/null | grep -q "libcuda.so.1 "; then
  export LD_LIBRARY_PATH="$ROOT/lib/stubs:$LD_LIBRARY_PATH"
fi
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
set +e +o pipefail
echo "cuda_env: nvcc $(nvcc --version | tail -1), compute cap $CUDA_COMPUTE_CAP, root $ROOT" >&2
