.PHONY: setup demo test test-full test-fast

PYTEST = .venv/bin/python -m pytest tests -v --durations=20

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/vllm-adadecode demo

# The default suite (CI): 21-28 minutes on a 2-core machine, set-up included.
test: setup
	$(PYTEST)

# The long tier: a 160-request soak, SmolLM2 parity sweeps, compiled starts.
test-full: setup
	$(PYTEST) --full -m full

# Developers' loop: every test that starts no vLLM engine (under a minute).
test-fast: setup
	$(PYTEST) -m "not engine"
