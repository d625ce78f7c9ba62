# make demo · make test · make bench — each creates .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint format bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch and torchvision resolved together from the registry (see DESIGN.md)
	$(BIN)/python -m pip install --quiet torch torchvision
	# the optional extras too, so the serve, plot, ONNX, digits and model-library tests run for real
	$(BIN)/python -m pip install --quiet -e '.[test,serve,plot,onnx,digits,coverage]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m fxprune.demo

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check fxprune cli zoo tests benchmarks examples
	$(BIN)/ruff format --check fxprune cli zoo tests benchmarks examples
	# the stage layers (pyproject.toml [tool.importlinter]): no stage imports a later one
	LINT_IMPORTS=$(abspath $(BIN))/lint-imports .ci/lint-imports

format: $(STAMP)
	$(BIN)/ruff format fxprune cli zoo tests benchmarks examples
	$(BIN)/ruff check --fix fxprune cli zoo tests benchmarks examples

bench: $(STAMP)
	$(BIN)/python benchmarks/compile_time.py
	$(BIN)/python benchmarks/latency.py --batch 1
	$(BIN)/python benchmarks/latency.py --batch 8 --repeats 6
	$(BIN)/python benchmarks/latency.py --model mobilenet_v2 --batch 1
	$(BIN)/python benchmarks/latency.py --model mobilenet_v2 --batch 8 --repeats 6
	$(BIN)/python benchmarks/conv_path.py
	$(BIN)/python benchmarks/trace_time.py
	$(BIN)/python benchmarks/ista_overhead.py
	$(BIN)/python benchmarks/paper_digits.py --jobs 2
	$(BIN)/python benchmarks/vs_torch_pruning.py --breakdown
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/cli_wall.py
	# fxprune (compile and in place) and Torch-Pruning on torchvision, timm, Ultralytics and
	# transformers: 154 models, ~40 min with 2 jobs on a 2-core machine shared with others
	$(BIN)/python benchmarks/coverage.py --jobs 2 --markdown docs/coverage.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
