# The two commands a newcomer needs (see README.md):
#   make run    install, train the demo bot's model on first use, serve on http://127.0.0.1:8000
#   make test   install and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 (CPU) is read from a local wheel folder where the machine has one.
PIP_FLAGS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
BOT ?= shop

.PHONY: run test install model serve bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(PIP_FLAGS) -e '.[train,dev]'
	touch $@

install: $(VENV)/.installed

# Trains models/$(BOT)/ from knowledge/$(BOT).yaml the first time, with progress bars;
# afterwards the existing model is reused (delete the folder to retrain).  Exit status 3: the
# model did worse than the bot's knowledge classifier and was not installed; the bot then
# answers with that classifier, so the server still starts.
model: install
	@test -f models/$(BOT)/model.onnx || $(BIN)/kefu train --bot $(BOT) || test $$? -eq 3

serve: install
	$(BIN)/kefu serve

run: model serve

# The second run starts every in-process server test again on the Redis seams (broker,
# routing state, session memory, limits: what several workers and nodes share).
REDIS_TEST_URL ?= redis://127.0.0.1:6379/0
test: install
	$(BIN)/pytest -q
	KEFU_TEST_SHARED=$(REDIS_TEST_URL) $(BIN)/pytest -q tests/server

# The full-data intent benchmark (about 30 minutes on 2 cores; --protocol all adds the
# held-out and few-shot protocols, about an hour more) and the server and storage load tests.
bench: install
	$(BIN)/python bench/bench_knowledge_classifier.py
	$(BIN)/python bench/bench_intent.py --protocol full
	$(BIN)/python bench/bench_storage.py
	$(BIN)/python bench/bench_server.py

clean:
	rm -rf $(VENV) build *.egg-info
