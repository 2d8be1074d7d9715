# The two commands of the README: `make demo` and `make test`. Each builds .venv on its own.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# Zero-shot W4A4 of the embedded model (fast preset), its report, then its accuracy on the digits test split.
demo: $(STAMP)
	mkdir -p out/demo
	$(BIN)/onnxgenie quantize models/digits_resnet8.onnx -o out/demo/digits_resnet8_w4a4.onnx --overwrite --holdout-images 128 \
		--report out/demo/report.json --report-html out/demo/report.html
	$(BIN)/python -m onnxgenie.datasets out/demo/digits_test.npz test
	$(BIN)/onnxgenie eval out/demo/digits_resnet8_w4a4.onnx --data out/demo/digits_test.npz \
		--reference models/digits_resnet8.onnx

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out
