# Every target first runs scripts/bootstrap.sh, which is a no-op (stamp file)
# when the venv is already up to date.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: bootstrap demo test bench clean distclean

bootstrap:
	RECPEFT_VENV=$(VENV) bash scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/recpeft demo

# pytest's exit status fails the recipe, so `make test` exits non-zero
# (make reports 2) whenever pytest does.
test: bootstrap
	$(PY) -m pytest -q

# Benchmarks are not collected by the default run (python_files = test_*.py);
# here both test_*.py and bench_*.py under benchmarks/ are collected.
bench: bootstrap
	$(PY) -m pytest benchmarks -q -s -o 'python_files=test_*.py bench_*.py' \
		--benchmark-columns=median,iqr,rounds

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks .hypothesis
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

# Also removes the venv.
distclean: clean
	rm -rf $(VENV)
