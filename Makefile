# One virtual environment, created on first use. torch is installed first and
# explicitly: a bare `torch` requirement would pull a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
MODEL ?= models/tiny-space-py
EXTRAS ?= dev,train,bench,server,otel

.PHONY: setup serve run test bench tiny-model datastore clean gpu-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	# TGI's own Python client, for the compatibility tests: it pins huggingface-hub<1,
	# which transformers 5 cannot share; its other needs (pydantic, aiohttp, requests) are in dev.
	$(PY) -m pip install --quiet --no-deps "text-generation==0.7.0"
	touch $@

## The main job: serve the bundled model with TGI's HTTP API and the OpenAI routes.
serve: setup
	$(VENV)/bin/tgi-space serve --model $(MODEL) --hostname 127.0.0.1 --port 8080

## SPACE generation on the bundled model, with its statistics.
run: setup
	$(VENV)/bin/tgi-space generate --model $(MODEL) --speculate space --max-new-tokens 128 \
	  "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"

## Tests; pytest's exit code 5 (nothing collected) fails like any other.
test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests integration-tests

## On a GPU machine: the CUDA tests (flash backend, parity, SPACE == plain decoding) and a short
## speed table. Without a GPU it says so and succeeds, so it is safe to call anywhere.
gpu-check: setup
	@if ! $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  echo "gpu-check: SKIPPED: torch $$($(PY) -c 'import torch; print(torch.__version__)') sees no CUDA device."; \
	  echo "gpu-check: on a GPU machine, install a CUDA build of torch (and optionally flash-attn) into $(VENV), then run it again."; \
	else \
	  $(PY) -m pytest -q -p no:cacheprovider -m cuda -rs -s tests; \
	fi

bench: setup
	$(VENV)/bin/tgi-space bench --model $(MODEL) --out benchmarks

## Rebuild the bundled model from scratch on 2 idle CPU cores: the base (corpus, tokenizer, stages 1-2,
## the base continuation; build_tiny_model.py), then the self-distilled data, the gated-LoRA SPACE
## adapters and the SAR-SFT comparison (build_space_models.py). Times per stage: the model card.
tiny-model: setup
	$(PY) scripts/build_tiny_model.py --work build/tiny-model --until base
	$(PY) scripts/build_space_models.py --base build/tiny-model/base/final --work build/space-models --out $(MODEL)
	$(MAKE) datastore

## The bundled model's self-drafted datastore (~1.5 min): its own greedy continuations of the function heads
## of this interpreter's standard library, where suffix drafts are also looked up (docs/speculation.md).
datastore: setup
	$(VENV)/bin/tgi-space datastore --model $(MODEL) --tokens 200000

clean:
	rm -rf $(VENV) build .pytest_cache
