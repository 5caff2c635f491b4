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

.PHONY: demo test bench system venv lerobot-venv clean

system:
	@missing=""; \
	command -v ffmpeg >/dev/null || missing="$$missing ffmpeg"; \
	dpkg -s libosmesa6 >/dev/null 2>&1 || missing="$$missing libosmesa6"; \
	dpkg -s libgl1 >/dev/null 2>&1 || missing="$$missing libgl1"; \
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

# LeRobot in an environment of its own: lerobot 0.4.4 pins torch < 2.11, so it cannot share .venv
# (torch 2.14.1). tests/test_robot_export.py loads our exports with it. --no-deps, plus exactly
# what `from lerobot.datasets.lerobot_dataset import LeRobotDataset` imports; torchvision 0.29 has
# no video reader, so frames decode with torchcodec (0.17 works with any torch >= 2.11).
# torch itself comes from .venv through a .pth line placed after the environment's own packages:
# a second copy of torch's CUDA wheels is 6 GB and took 7.5 min to install here; what the
# environment installs itself (datasets, huggingface-hub < 0.36, av < 16) shadows .venv's versions.
LEROBOT_VENV  := .venv-lerobot
LEROBOT_STAMP := $(LEROBOT_VENV)/.installed
$(LEROBOT_STAMP): $(STAMP) Makefile
	@test -x $(LEROBOT_VENV)/bin/python || $(PY) -m venv $(LEROBOT_VENV)
	$(LEROBOT_VENV)/bin/python -c "import site, sys; open(site.getsitepackages()[0] + '/gr2-venv-torch.pth', 'w').write(sys.argv[1] + chr(10))" \
	  "$$($(BIN)/python -c 'import site; print(site.getsitepackages()[0])')"
	$(LEROBOT_VENV)/bin/pip install -q torchcodec==0.17.0 \
	  'datasets>=4,<5' 'huggingface-hub>=0.34.2,<0.36' 'accelerate>=1.10,<2' 'av>=15,<16'
	$(LEROBOT_VENV)/bin/pip install -q --no-deps lerobot==0.4.4
	@touch $(LEROBOT_STAMP)

lerobot-venv: system $(LEROBOT_STAMP)

demo: venv
	$(BIN)/python -m gr2.flows.demo

# Two pytest workers, one test file each at a time (module fixtures stay shared within a file):
# most tests wait on Ray, Prefect, ffmpeg or a subprocess, so two overlap well on two cores
# (1.5x on build, training and Meta-World tests measured side by side). The heaviest files start
# first (tests/conftest.py: HEAVY_FIRST), so no long file runs alone at the end.
test: venv lerobot-venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25 tests

bench: venv
	$(BIN)/python benchmarks/build_throughput.py

clean:
	rm -rf $(VENV) $(LEROBOT_VENV) .demo-lake .demo-robot
