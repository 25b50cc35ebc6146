# One virtualenv in .venv holds everything, MPI included (the mpich wheel's mpiexec).
# `make train` installs the core dependencies only; `make test` and `make bench` add their
# extras (pyproject.toml [project.optional-dependencies]) on top, without rebuilding.
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
MPIEXEC  := $(VENV)/bin/mpiexec
NP       ?= 2
ARGS     ?=
STAMP    := $(VENV)/.installed
PYTEST   := $(PY) -m pytest -p no:cacheprovider
# pip for the editable install, without setuptools' boxed caution that it is one (it is meant to be)
PIP_EDITABLE := PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install

.PHONY: venv build train test test-fast bench gpu-check gpu-wheels gpu-check-offline gpu-run gpu-first-contact clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.pyx csrc/*.pxd csrc/*.pxi csrc/*.h kernels/*)
	@echo "== creating $(VENV) and installing the engine with its core dependencies (numpy, mpi4py, the"
	@echo "== MPICH wheel, scikit-learn, Pillow, threadpoolctl), then compiling its C extensions"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar off --upgrade pip
	$(PIP_EDITABLE) --progress-bar off -e .
	touch $(STAMP)
	@echo "== ready: run the job with $(MPIEXEC) -n 2 $(PY) -m engine.train, or source $(VENV)/bin/activate first"

# An extra's packages, read from pyproject.toml; the stamp file keeps the list it installed.
$(VENV)/.extra-%: $(STAMP) pyproject.toml
	@echo "== installing the '$*' extras into $(VENV) (for test: pytest, torch CPU, CuPy and NVIDIA wheels, cuDNN included: .venv about 4.3 GB)"
	$(PY) -c "import sys, tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies'][sys.argv[1]]))" $* > $@.txt
	$(PY) -m pip install --progress-bar off -r $@.txt
	mv $@.txt $@

venv: $(STAMP)

# Rebuild the Cython extensions in place after editing csrc/ or kernels/. Through pip,
# as make venv builds them: Cython comes from the build requirements, not from the venv.
build: $(STAMP)
	$(PIP_EDITABLE) -q --no-deps -e .

train: $(STAMP)
	$(MPIEXEC) -n $(NP) $(PY) -m engine.train $(ARGS)

# The whole suite: one process for the plain tier, then the mpi tier under mpiexec -n 2.
test: $(VENV)/.extra-test
	$(PYTEST) -q -m "not mpi" tests
	$(MPIEXEC) -n 2 $(PY) tests/mpi_pytest.py -q -m "mpi and not slow" tests
	$(MPIEXEC) -n 2 $(PY) tests/mpi_pytest.py -q -m "mpi and slow and not np4" tests
	$(MPIEXEC) -n 4 $(PY) tests/mpi_pytest.py -q -m "mpi and np4" tests

test-fast: $(VENV)/.extra-test
	$(PYTEST) -q -m "not mpi and not slow" tests
	$(MPIEXEC) -n 2 $(PY) tests/mpi_pytest.py -q -m "mpi and not slow" tests

bench: $(VENV)/.extra-test $(VENV)/.extra-bench
	$(PY) bench/step.py
	$(PY) bench/kernels.py
	$(PY) bench/overlap.py
	$(PY) bench/loader.py

# Everything that needs a device: the gpu-marked tests, the mpi-and-gpu tier on one rank per
# visible GPU (when there are two or more), then the kernel benchmarks. CuPy comes with the gpu
# extra, so it is installed before the device is probed; the probe exits non-zero with the
# reason when no device is usable (no CuPy, no driver, a driver older than CuPy's runtime, ...).
gpu-check: $(STAMP)
	@echo "== installing the gpu, test and bench extras into $(VENV) (CuPy, NCCL, cuDNN, torch CPU: a few minutes)"
	$(PY) -m pip install -q -e '.[gpu,test,bench]'
	$(MAKE) --no-print-directory gpu-run

# The GPU machines this project is lent reach no package index, but their image has CuPy (for
# CUDA 13), NCCL, NumPy, Cython, pytest and torch in its python3. So: `make gpu-wheels` here
# (the MPICH wheel, 13 MB, and Cython's pure-Python wheel, for an interpreter without it, into
# .wheels/), carry .wheels with the tree, and run `make gpu-check-offline` there: MPICH (and
# Cython where missing) from the carried wheels INTO THAT INTERPRETER (SYSPY, the system
# python3 by default), our extensions built in place against its NumPy, then the same checks.
SYSPY    ?= python3
WHEELS   ?= .wheels

gpu-wheels:
	$(PYTHON) -m pip download --no-deps -d $(WHEELS) mpich
	$(PYTHON) -m pip download --no-deps -d $(WHEELS) --only-binary=:all: --platform any 'cython>=3.0'

gpu-check-offline:
	@$(SYSPY) -c "import importlib.util as u, sys; miss = [m for m in ('numpy', 'ml_dtypes', 'mpi4py', 'pytest', 'cupy') if u.find_spec(m) is None]; miss and sys.exit('gpu-check-offline: ' + sys.executable + ' has no ' + ', '.join(miss) + ' (the GPU image has them all; elsewhere run make gpu-check)')"
	@echo "== installing MPICH (and Cython where it is missing) from $(WHEELS)/ into $$($(SYSPY) -c 'import sys; print(sys.executable)')"
	$(SYSPY) -m pip install -q --no-index --no-deps $(WHEELS)/mpich-*.whl
	$(SYSPY) -c "import Cython" 2>/dev/null || $(SYSPY) -m pip install -q --no-index --no-deps $(WHEELS)/cython-*.whl
	$(SYSPY) setup.py -q build_ext --inplace
	$(MAKE) --no-print-directory gpu-run PY=$(SYSPY) \
	  MPIEXEC=$$($(SYSPY) -c "import os, sys; print(os.path.dirname(sys.executable))")/mpiexec

# The checks themselves, with the interpreter PY (engine importable from this checkout).
gpu-run: export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
gpu-run:
	@$(PY) -m engine.backend || exit 1; st=0; \
	$(PYTEST) -q -m "gpu and not mpi" -rs tests || st=1; \
	n=$$($(PY) -c "from engine.backend import gpu_count; print(gpu_count())"); \
	if [ "$$n" -gt 1 ]; then \
	  echo "gpu-check: the mpi and gpu tier on $$n ranks"; \
	  $(MPIEXEC) -n $$n $(PY) tests/mpi_pytest.py -q -m "mpi and gpu" tests || st=1; \
	else echo "gpu-check: one GPU: the mpi and gpu tier needs two or more, not run"; fi; \
	$(PY) bench/kernels.py --gpu || st=1; \
	exit $$st

# The first contact with a lent GPU machine, one command, everything logged under OUT
# (tools/gpu_first_contact.sh says what it runs); MPICH from the carried wheel when there is one.
OUT ?= gpu-first-contact
gpu-first-contact:
	-@ls $(WHEELS)/mpich-*.whl >/dev/null 2>&1 && $(SYSPY) -m pip install -q --no-index --no-deps $(WHEELS)/mpich-*.whl
	tools/gpu_first_contact.sh $(OUT) $(SYSPY)

clean:
	rm -rf build engine/*.so engine/*.c $(VENV)
