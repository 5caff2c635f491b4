# Each target bootstraps .venv (and the system packages it needs) first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export MUJOCO_GL ?= osmesa
export PYOPENGL_PLATFORM ?= osmesa
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_ENABLE_UV_RUN_RUNTIME_ENV ?= 0
export RAY_DEDUP_LOGS ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test bench system venv clean

system:
	@missing=""; \
	command -v ffmpeg >/dev/null || missing="$$missing ffmpeg"; \
	dpkg -s libosmesa6 >/dev/null 2>&1 || missing="$$missing libosmesa6"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

venv: system $(STAMP)

demo: venv
	$(BIN)/python -m gr2.flows.demo

test: venv
	$(BIN)/python -m pytest -q --durations=15 tests

bench: venv
	$(BIN)/python benchmarks/build_throughput.py

clean:
	rm -rf $(VENV) .demo-lake .demo-robot
