#!/usr/bin/env bash
# The wheels bench/device_check.sh installs on a bare CUDA machine (torch and transformers there, no package
# index): DeepSpeed (pure Python, built here from its source distribution with no compiled ops) and what
# DeepSpeed and the project's learner import that such an image lacks. The rest of DeepSpeed's needs
# (einops, msgpack, ninja, numpy, packaging, psutil, py-cpuinfo, tqdm) and the learner's (peft, pillow,
# safetensors, pyyaml) are in the lent machine's image (the device tool's KINDS.md lists it).
#
#   bench/device_wheels.sh [DIR] [PYTHON_VERSION]     (defaults: .whl and 3.12, the lent machine's Python)
#
# Run it here, from the repository root, with pip able to reach its usual index (this machine's is local).
# Versions are the ones the project's venv runs with. The folder is about 5 MB; the device tool carries up to
# 64 MiB (`echo /.whl/ >> .git/info/exclude` keeps it out of git; `carry: [".whl"]` takes it along).
set -euo pipefail
dir=${1:-.whl}
py=${2:-3.12}
python=${PYTHON:-python3}

rm -rf "$dir"
mkdir -p "$dir"
DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps deepspeed==0.19.8 -w "$dir"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0 omegaconf==2.4.0
echo "device_wheels: $(find "$dir" -name '*.whl' | wc -l) wheels, $(du -sh "$dir" | cut -f1) in $dir (Python $py)"
