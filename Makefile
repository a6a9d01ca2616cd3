.PHONY: setup demo test

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/vllm-adadecode demo

test: setup
	.venv/bin/python -m pytest tests -v --durations=40
