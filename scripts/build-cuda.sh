#!/usr/bin/env bash
# Builds `starling` with `--features cuda` on a machine without a GPU or a CUDA
# install, from NVIDIA's CUDA 13.0 wheels on PyPI (see README, "CUDA").
#
# Kept out of CI: nvcc compiles candle-kernels for about 20 minutes on 2 cores,
# on top of a release build. Run it when the CUDA code or candle changes.
#
#   bash scripts/build-cuda.sh            # -> target/cuda/release/starling
#   CUDA_COMPUTE_CAP=80 bash scripts/build-cuda.sh   # A100 instead of H100/H200
#
# The binary links libcuda (the driver), libcudart, libcublas(Lt), libcurand and
# libnvrtc of CUDA 13, so it only starts where a driver is installed and those
# libraries are on the loader's path (a CUDA 13 toolkit, or the same wheels:
# LD_LIBRARY_PATH=<site-packages>/nvidia/cu13/lib).
#
# Why 13.0 and not the newest 13.x: candle's kernels ship as PTX that the
# driver compiles when the program starts, and a driver rejects PTX from a
# toolkit newer than itself. Built with 13.4, the binary failed on an H100
# with driver 580.159 (CUDA 13.0) with CUDA_ERROR_UNSUPPORTED_PTX_VERSION;
# 13.0 PTX runs on every CUDA 13 driver (580 and later).
set -euo pipefail
cd "$(dirname "$0")/.."

toolkit=${CUDA_TOOLKIT_DIR:-$PWD/target/cuda-toolkit/13.0}
site=$toolkit/site
cu=$site/nvidia/cu13

if [[ ! -x $cu/bin/nvcc ]]; then
    echo "== fetching the CUDA 13.0 toolkit wheels into $toolkit"
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
        --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
        -d "$toolkit/wheels" \
        'nvidia-cuda-nvcc==13.0.*' 'nvidia-cuda-crt==13.0.*' 'nvidia-nvvm==13.0.*' \
        'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-nvrtc==13.0.*' \
        'nvidia-cuda-cccl==13.0.*' 'nvidia-cublas==13.0.*' 'nvidia-curand==10.4.0.*'
    python3 -m pip install --quiet --no-deps --no-index --target "$site" "$toolkit"/wheels/*.whl
fi

# The wheels ship only versioned names (libcudart.so.13); the linker asks for
# libcudart.so.
for lib in "$cu"/lib/lib*.so.*; do
    base=${lib%%.so.*}.so
    [[ -e $base ]] || ln -s "$(basename "$lib")" "$base"
done

# libcuda belongs to the driver and is not on PyPI. candle links it directly
# (cudarc's `dynamic-linking`), so the link needs a library that exports the
# driver entry points cudarc declares; a stub of empty functions does. The
# real driver replaces it at run time (same soname).
stubs=$cu/lib/stubs
if [[ ! -e $stubs/libcuda.so ]]; then
    mkdir -p "$stubs"
    cargo fetch --quiet
    cudarc=$(cargo metadata --format-version 1 --features cuda |
        python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\(' "$cudarc/src/driver/sys/mod.rs" | tr -d '(' | sort -u |
        sed 's/.*/void &(void) {}/' >"$stubs/libcuda.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda.c"
fi

export CUDA_HOME=$cu CUDA_PATH=$cu PATH=$cu/bin:$PATH
# candle-kernels' build script reruns when NVCC changes, not when PATH does:
# naming the (versioned) nvcc makes a toolkit change rebuild the kernels.
export NVCC=$cu/bin/nvcc
# No nvidia-smi here to ask: 90 = Hopper (H100, H200).
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
echo "== nvcc: $(nvcc --version | tail -1); compute capability $CUDA_COMPUTE_CAP"
# Its PTX is cached by source hash, not by compiler: a toolkit change must
# clean it, or the old PTX ships.
stamp=target/cuda/nvcc-version
version=$(nvcc --version | tail -1)
if [[ -e $stamp && $(cat "$stamp") != "$version" ]]; then
    cargo clean --release --target-dir target/cuda -p candle-kernels
fi
cargo build --release --features cuda --target-dir target/cuda "$@"
echo "$version" >"$stamp"
ls -l target/cuda/release/starling
