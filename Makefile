# Shortcuts for the commands the README and bench/BENCHMARKS.md document. Timed benchmarks take
# /tmp/fedloom-bench.lock so that two of them never share this machine's cores.
PYTHON ?= python
LOCK := flock /tmp/fedloom-bench.lock

.PHONY: test run bench bench-setup bench-core bench-vectorized bench-deploy repro repro-quick

test:  ## install everything and run every check CI runs
	bash scripts/test.sh

run:  ## the embedded default federation
	fedloom run

bench-setup:  ## the separate Flower environment (bench/.venv-flower), once
	bash bench/peers/setup.sh

bench: bench-setup  ## fedloom vs the plain PyTorch floor vs Flower, workloads (a), (b), (c)
	$(LOCK) $(PYTHON) bench/peers/run.py

bench-core:  ## issue 2 targets: overhead vs the floor, workers, aggregation, learning
	$(LOCK) $(PYTHON) bench/core.py

bench-vectorized:  ## vectorized mode vs the floor on workload (b)
	$(LOCK) $(PYTHON) bench/vectorized.py --rounds 40

bench-deploy: bench-setup  ## issue 4: fedloom over gRPC vs Flower's deployment runtime, 20 processes
	$(LOCK) $(PYTHON) bench/deploy/run.py

repro:  ## the paper reproductions of bench/repro (long: see bench/BENCHMARKS.md)
	$(PYTHON) bench/repro/mcmahan_2nn.py --max-rounds 1200
	$(PYTHON) bench/repro/mcmahan_cnn.py
	$(PYTHON) bench/repro/femnist_cnn.py
	$(PYTHON) bench/repro/shakespeare_lstm.py

repro-quick:  ## the short reproductions the test suite runs
	$(PYTHON) -m pytest -q tests/test_learning_mnist.py tests/test_repro_*.py
