# Every target first runs scripts/bootstrap.sh, which is a no-op (stamp file)
# when the venv is already up to date.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: bootstrap demo test lint bench aot aot-triton36 clean distclean

bootstrap:
	RECPEFT_VENV=$(VENV) bash scripts/bootstrap.sh

# runs/demo is the make target's own scratch folder: a rerun replaces its report (reusing the
# saved base), so `make demo` works twice in a row.
demo: bootstrap
	$(VENV)/bin/recpeft demo --overwrite

# The lint habit first (import layering, ruff's rules, ruff's format), then the suite; any
# failing step fails the recipe, so `make test` exits non-zero (make reports 2).
# The pytest script, not `python -m pytest`: -m would put the repo root on sys.path, where our
# kernels/ hides HF's `kernels` package that transformers imports (scripts/bootstrap.sh).
test: bootstrap lint
	$(VENV)/bin/pytest -q

lint: bootstrap
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Benchmarks are not collected by the default run (python_files = test_*.py);
# here both test_*.py and bench_*.py under benchmarks/ are collected.
bench: bootstrap
	$(VENV)/bin/pytest benchmarks -q -s -o 'python_files=test_*.py bench_*.py' \
		--benchmark-columns=median,iqr,rounds

# Ahead-of-time compile of every Triton kernel variant for sm_90 (H100/H200), no GPU needed:
# fails on a compile error or a pickable config over the shared-memory limit, and writes the
# table (registers, spills, shared memory) to benchmarks/results/aot_sm90.json. The slow test
# (pytest -m slow tests/kernels/test_aot_sm90.py) runs the same full matrix.
aot: bootstrap
	env -u TRITON_INTERPRET $(PY) benchmarks/aot_compile.py --mode full --out benchmarks/results/aot_sm90.json

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks .hypothesis
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

# Also removes the venv.
distclean: clean
	rm -rf $(VENV)

# The covering sample again under triton 3.6 (the version on the lent H200), in a throwaway venv
# beside the project's (torch from this machine's disk, triton 3.6 from PyPI).
AOT36_VENV ?= /tmp/recpeft-triton36
aot-triton36: bootstrap
	python3 -m venv $(AOT36_VENV)
	$(AOT36_VENV)/bin/pip install -q --disable-pip-version-check "torch==2.13.0" "triton==3.6.*" numpy
	$(AOT36_VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation . 2>/dev/null \
		|| $(AOT36_VENV)/bin/pip install -q --disable-pip-version-check --no-deps .
	cd / && env -u TRITON_INTERPRET $(AOT36_VENV)/bin/python $(CURDIR)/benchmarks/aot_compile.py --mode sample \
		--out $(CURDIR)/benchmarks/results/aot_sm90_triton36.json
