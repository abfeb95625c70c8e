# The whole set-up a new user needs: `make demo` and `make test`.
# TORCH_SPEC picks the torch build; on a machine with a local CPU wheel use e.g. TORCH_SPEC=torch==2.13.0.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch>=2.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.lipverify-installed
TEST_STAMP := $(VENV)/.lipverify-test-installed

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# auto-lirpa 0.3 pins torch<1.13 (no build for current Pythons) and onnx2torch pulls torchvision,
# which must match torch exactly: install both without their pins. Their real needs are in
# lipverify's dependencies; lipverify patches auto_LiRPA for torch 2 at import and only needs
# torchvision for ONNX ops it cannot verify anyway (NMS, RoiAlign).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps "auto-lirpa==0.3" "onnx2torch>=1.5"
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lipverify certify

test: $(TEST_STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
