#!/usr/bin/env bash
# Compiles the CUDA kernels with NVRTC 13.0 (the runtime compiler of the CUDA 13.0 driver the GPU
# machines run; CI has no GPU, and the kernels are otherwise first compiled there). NVRTC comes
# from PyPI (nvidia-cuda-nvrtc, 90 MB, cached like the test models). Newer NVRTC accepts source
# that 13.0 refuses: a generic lambda in device code compiled here with 13.5 and not on the GPU.
#
#   bash tools/ci-nvrtc.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${BITNET_TEST_CACHE:-${HOME}/.cache/bitnet-rust/test-models}"
version=13.0.88
lib="${cache}/nvrtc-${version}/nvidia/cu13/lib"
python="${PYTHON:-python3}"
if [[ ! -e "${lib}/libnvrtc.so.13" ]]; then
    mkdir -p "${cache}/wheels"
    "${python}" -m pip download --quiet --no-deps --only-binary=:all: \
        -d "${cache}/wheels" "nvidia-cuda-nvrtc==${version}" >&2
    wheel="$(ls "${cache}"/wheels/nvidia_cuda_nvrtc-${version}-*.whl | head -n 1)"
    rm -rf "${cache}/nvrtc-${version}.part"
    "${python}" -m zipfile -e "${wheel}" "${cache}/nvrtc-${version}.part"
    mv "${cache}/nvrtc-${version}.part" "${cache}/nvrtc-${version}"
fi
# BITNET_REQUIRE_NVRTC: the test fails, not skips, when the library does not load.
LD_LIBRARY_PATH="${lib}${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}" BITNET_REQUIRE_NVRTC=1 \
    cargo test -p bitnet-cuda --test kernels_compile
