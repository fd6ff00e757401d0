# Odyssey: every target sets itself up (virtual environment, installs) and then runs.
#   make demo   the whole pipeline on this machine, end to end
#   make test   the test suite (what CI runs)
# Choose a torch build:  make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# Without TORCH_SPEC: a CPU build unless an NVIDIA GPU is present (never a multi-GB CUDA build on a CPU box).

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?=
TORCH_VERSION := 2.13.0
BIN   := $(VENV)/bin
STAMP := $(VENV)/.odyssey-installed

BENCHES ?= data data_scale train_throughput train_overhead serve_load tune_efficiency elastic onnx soak demo autoscaler tasks

.PHONY: demo test lint bench bench-data bench-data-scale bench-train bench-serve bench-tune bench-elastic bench-onnx bench-soak bench-demo bench-autoscaler bench-tasks setup clean

demo: $(STAMP)
	$(BIN)/odyssey demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache --no-logo

# Every benchmark that runs on a CPU machine (~160 minutes on 2 cores), then the README's results table
# from their JSON. Some: make bench BENCHES="onnx data". (bench/gpu_train.sh needs a GPU machine.)
bench: $(STAMP)
	@for b in $(BENCHES); do echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || exit 1; done
	$(BIN)/python bench/readme_table.py

bench-data: $(STAMP)  # ~1 minute
	$(BIN)/python bench/data.py $(ARGS)

bench-data-scale: $(STAMP)  # ~10 minutes on 2 cores: bytes each rank reads, index vs stream; throughput; resume
	$(BIN)/python bench/data_scale.py $(ARGS)

bench-train: $(STAMP)  # ~25 minutes on 2 cores
	$(BIN)/python bench/train_throughput.py $(ARGS)

bench-serve: $(STAMP)  # ~10 minutes on 2 cores
	$(BIN)/python bench/serve_load.py $(ARGS)

bench-tune: $(STAMP)  # ~60 minutes on 2 cores
	$(BIN)/python bench/tune_efficiency.py $(ARGS)

bench-elastic: $(STAMP)  # ~6 minutes on 2 cores
	$(BIN)/python bench/elastic.py $(ARGS)

bench-onnx: $(STAMP)  # ~3 minutes on 2 cores
	$(BIN)/python bench/onnx.py $(ARGS)

bench-soak: $(STAMP)  # 30 minutes (ARGS="--minutes 10" for less)
	$(BIN)/python bench/soak.py $(ARGS)

bench-demo: $(STAMP)  # ~15 minutes on 2 cores: `odyssey demo`, then its model under ONNX Runtime
	$(BIN)/python bench/demo.py $(ARGS)

bench-autoscaler: $(STAMP)  # ~5 minutes on 2 cores: the README's laptop workflow, timed
	$(BIN)/python bench/autoscaler.py $(ARGS)

bench-tasks: $(STAMP)  # ~40 minutes on 2 cores: 25 min of training `tiny-cpu` on the full corpus, then every task vs its baseline
	$(BIN)/python bench/tasks.py $(ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then \
		$(BIN)/python -m pip install $(TORCH_SPEC); \
	elif $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 || [ "$$(uname -s)" = Darwin ]; then \
		$(BIN)/python -m pip install torch==$(TORCH_VERSION); \
	else \
		$(BIN)/python -m pip install torch==$(TORCH_VERSION)+cpu 2>/dev/null || \
		$(BIN)/python -m pip install torch==$(TORCH_VERSION) --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
