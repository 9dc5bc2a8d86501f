# Shortcuts for contributors; CI runs `python -m pytest` (the README's test command) through .ci/run.
.PHONY: test test-fast lint bench-tiny

test:          ## the whole suite, integration tests on the packaged weights and data included
	python -m pytest

test-fast:     ## unit tests on tiny random models only
	python -m pytest -m "not integration"

lint:
	ruff check .

bench-tiny:    ## every benchmark script on CPU-sized configs: checks they run, measures nothing
	python -m benchmarks.train_throughput --tiny --steps 2 --warmup 1 --device cpu
	python -m benchmarks.eval_throughput --tiny --device cpu
