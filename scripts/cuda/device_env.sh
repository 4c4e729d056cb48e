# Sourced on the GPU machine: unpacks the binaries carried in .device/ (built on the CPU machine:
# `scripts/cuda/pack.sh`) and puts CUDA's run-time compiler where cudarc looks for it.
set -e
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
for f in .device/*.xz; do xz -d -k -f "$f"; chmod +x "${f%.xz}"; done
# cudarc opens libnvrtc.so (or .so.12/.11/...): link whichever NVRTC this machine has.
NVRTC=$(ls /usr/local/cuda/lib64/libnvrtc.so* /usr/local/cuda/targets/x86_64-linux/lib/libnvrtc.so* \
        $(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)/nvidia/*/lib/libnvrtc.so* \
        2>/dev/null | grep -v builtins | head -1)
mkdir -p /tmp/nvrtc && ln -sf "$NVRTC" /tmp/nvrtc/libnvrtc.so
for dep in "$(dirname "$NVRTC")"/libnvrtc-builtins.so*; do ln -sf "$dep" /tmp/nvrtc/; done
# cuBLAS (prompts): cudarc looks for libcublas.so or .so.12/.11/...; link the one beside NVRTC.
CUBLAS=$(ls "$(dirname "$NVRTC")"/libcublas.so* /usr/local/cuda/lib64/libcublas.so* 2>/dev/null | head -1)
[ -n "$CUBLAS" ] && ln -sf "$CUBLAS" /tmp/nvrtc/libcublas.so
export LD_LIBRARY_PATH=/tmp/nvrtc:$(dirname "$NVRTC"):${LD_LIBRARY_PATH:-}
export MOESTREAM_BIN=$ROOT/.device/moestream
echo "nvrtc: $NVRTC; cublas: ${CUBLAS:-none}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
set +e
