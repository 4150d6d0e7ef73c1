#!/usr/bin/env bash
# The learner at the paper's 2B shape on a bare CUDA machine: torch and transformers installed, no package
# index, the rest carried as wheels (bench/device_wheels.sh). Installs the wheels into a folder of their own,
# checks that the learner's whole import chain loads from that folder and the image, then runs
# bench/gpu_learner.py (ZeRO-3, bf16, gradient checkpointing, the KL reference; one warm-up and --steps timed
# GRPO steps) and prints its step time, tokens per second, peak GPU memory and learner/transformers log-prob
# agreement. Results: gpu_learner.json and device_check.log in the output folder ($OUT when set).
#
#   bench/device_check.sh [--tiny] [--wheels DIR] [--target DIR] [--out DIR] [--steps N] [--timeout S]
#
# --tiny runs the same path at the test model's shape on CPU in fp32 (what tests/repo/test_device_check.py does here
# with no network). From the device tool, in the repository root (a command of under 2,000 characters):
#   run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."

wheels=.whl
target=${TMPDIR:-/tmp}/medvlm-device-site
out=${OUT:-runs/device-check}
tiny=0
steps=2
limit=450
python=${PYTHON:-python3}
while [ $# -gt 0 ]; do
    case "$1" in
        --tiny) tiny=1 ;;
        --wheels) wheels=$2; shift ;;
        --target) target=$2; shift ;;
        --out) out=$2; shift ;;
        --steps) steps=$2; shift ;;
        --timeout) limit=$2; shift ;;
        *) echo "device_check: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$out"
exec > >(tee "$out/device_check.log") 2>&1

say() { echo "device_check: $*"; }
die() { echo "device_check: $*" >&2; exit 1; }

start=$(date +%s)
say "$(date -u +%FT%TZ) on $(hostname), $($python --version 2>&1)"
shopt -s nullglob
carried=("$wheels"/*.whl)
[ ${#carried[@]} -gt 0 ] || die "no wheels in $wheels: build them with bench/device_wheels.sh and carry the folder"
$python -c 'import torch, transformers' 2>/dev/null \
    || die "$python lacks torch or transformers; this check expects a CUDA image that has both"
if [ "$tiny" = 0 ]; then
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
        || die "torch $($python -c 'import torch; print(torch.__version__)') sees no GPU; run with --tiny for the CPU path"
fi

say "installing ${#carried[@]} wheels into $target (no index)"
rm -rf "$target"
$python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "${carried[@]}"
export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ "$tiny" = 1 ] || export DS_ACCELERATOR=cuda

# Every module bench/gpu_learner.py reaches, so that a missing wheel is named here and not mid-run.
$python - <<'EOF' || die "the learner's imports fail (above): add the missing package to bench/device_wheels.sh"
import importlib
import sys

sys.path.insert(0, ".")
for name in ("deepspeed", "omegaconf", "pydantic", "hjson", "peft", "PIL", "safetensors", "yaml",
             "launcher.config", "learner.actor", "medvqa.prompt", "medvqa.synthetic", "medvqa.tiny_model",
             "protocol.batch"):
    module = importlib.import_module(name)
    print(f"device_check: import {name:<18} {getattr(module, '__version__', '')}")
EOF

if [ "$tiny" = 1 ]; then
    shape=(--size tiny --device cpu --prompts 2 --prompt-tokens 140 --completion-tokens 12 --image-size 56)
else
    shape=(--size 2b --device cuda)
fi
say "bench/gpu_learner.py ${shape[*]} --steps $steps (limit ${limit} s)"
status=0
timeout "$limit" $python bench/gpu_learner.py "${shape[@]}" --steps "$steps" --json "$out/gpu_learner.json" \
    || status=$?
[ "$status" = 124 ] && die "bench/gpu_learner.py ran past ${limit} s (raise --timeout, or lower --steps)"
[ "$status" = 0 ] || die "bench/gpu_learner.py failed with exit code $status (its output is above)"
say "done in $(( $(date +%s) - start )) s; results in $out/gpu_learner.json"
