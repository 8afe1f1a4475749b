# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO := demo

.PHONY: demo test lint clean

# Python writes .pyc files as it imports (the venv is installed with --no-compile: pip's own
# compiling of every file is slow). Where PYTHONDONTWRITEBYTECODE is set, as on some
# machines, it never would, and every process would compile its imports again (importing
# TensorFlow 10.4 s instead of 4.3 s: make test took 6 min 17-53 s).
unexport PYTHONDONTWRITEBYTECODE

# uv installs the same wheels as pip, ~13 s where pip took 35-44 s (6 s from uv's own cache,
# ~/.cache/uv: pip kept none of its downloads here); pip where uv cannot be had.
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	($(BIN)/python -m pip install --quiet uv && $(BIN)/uv pip install --quiet --python $(BIN)/python -e ".[test,jax,mni]") \
	  || ($(BIN)/python -m pip install --quiet --upgrade pip && $(BIN)/python -m pip install --quiet --no-compile -e ".[test,jax,mni]")
	touch $(INSTALLED)

test: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 --dist worksteal --durations=15

demo: $(INSTALLED)
	$(BIN)/python scripts/make_phantoms.py $(DEMO)/bids --subjects 48 --seed 0 --flair --overwrite
	$(BIN)/python -m preprocess $(DEMO)/bids -o $(DEMO)/store.h5 --label-column group --overwrite
	$(BIN)/python -m loader $(DEMO)/store.h5 --preview $(DEMO)/preview.png
	$(BIN)/python -m training $(DEMO)/store.h5 -o $(DEMO)/run --epochs 5 --batch-size 64 --tensorboard --overwrite
	$(BIN)/python -m training $(DEMO)/store.h5 -o $(DEMO)/run-age --target age --epochs 5 --batch-size 64 --overwrite
	$(BIN)/python -m training explain $(DEMO)/run -o $(DEMO)/explain --overwrite
	$(BIN)/python -m training compare $(DEMO)/run $(DEMO)/run-age -o $(DEMO) --overwrite
	$(BIN)/python -m preprocess $(DEMO)/bids -o $(DEMO)/lesions.h5 --suffix T1w FLAIR --masks lesion --label-column group --overwrite
	$(BIN)/python -m loader $(DEMO)/lesions.h5 --preview $(DEMO)/lesions.png --count 12
	$(BIN)/python -m training $(DEMO)/lesions.h5 -o $(DEMO)/run-lesions --target mask --epochs 3 --batch-size 16 --overwrite
	$(BIN)/python scripts/make_phantoms.py $(DEMO)/new --subjects 4 --seed 1 --flair --overwrite
	$(BIN)/python -m training predict $(DEMO)/run-lesions $(DEMO)/new -o $(DEMO)/predicted --overwrite
	$(BIN)/python scripts/make_heads.py $(DEMO)/heads --heads 8 --shape 96 128 128 --voxel 2 2 2 --seed 0
	$(BIN)/python -m preprocess $(DEMO)/heads -o $(DEMO)/mni.h5 --space mni --overwrite
	$(BIN)/python -m loader $(DEMO)/mni.h5 --qc $(DEMO)/qc.png

lint: $(INSTALLED)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
