# lgm-ext: `make demo` installs everything and runs the main job; `make test` installs and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch's CUDA 13.0 build (CPU works too); the extension compiles against it.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
JOBS   ?= 2
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: install demo test test-reference test-slow test-all lint docs bench build-cpu clean gpu-check test-sanitize \
        mutation-check

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	@# Fashion-MNIST, the default dataset, from Debian (offline); elsewhere torchvision downloads it.
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing dataset-fashion-mnist (Debian)"; \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) \
	    > /dev/null 2>&1 || echo "note: could not install dataset-fashion-mnist; Fashion-MNIST will be downloaded if the network allows"; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "setuptools>=68" wheel ninja numpy
	$(PIP) install -q $(TORCH)
	@mkdir -p build
	@echo "building lgm-ext (C++ and, when a CUDA toolkit is found, CUDA kernels; log: build/build.log)"
	LGM_EXT_REQUIRE_BUILD=1 MAX_JOBS=$(JOBS) $(PIP) install -v --no-build-isolation -e '.[all]' > build/build.log 2>&1 \
	  || { tail -n 60 build/build.log; exit 1; }
	@grep -E "ptxas info|bytes spill" build/build.log > build/ptxas.log || true
	@$(PY) -c "import lgm_ext; print('lgm_ext', lgm_ext.__version__, '| CUDA kernels:', lgm_ext.has_cuda_kernels())"
	touch $@

# Fast iteration: C++ only, no CUDA compile.
build-cpu:
	LGM_EXT_REQUIRE_BUILD=1 LGM_EXT_CPU_ONLY=1 MAX_JOBS=$(JOBS) $(PIP) install --no-build-isolation --no-deps -e .

# The main job: re-measure the source documents' claims (quick preset: 3 heads x 256 SGD steps on
# Fashion-MNIST; ~10 min on a 2-core VM: 9.6-10.6 measured, docs/reproducing.md) into runs/reproduce/report.md.  Re-running reuses
# finished checkpoints.
demo: install
	$(VENV)/bin/lgm reproduce --preset quick --out runs/reproduce
	@echo "report: runs/reproduce/report.md (figures in runs/reproduce/figures)"

# The fast tier (operators, API, detector, attacks, CLI errors; a few minutes); `make test-slow` runs the rest
# (training, several processes, end-to-end commands, builds), `make test-all` both, as CI does (.ci/run).
test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

# The fast tier against the pure-PyTorch path, as a user without a compiler has it (LGM_EXT_NO_BUILD=1): with
# LGM_EXT_DISABLE_KERNELS=1 the package does not load its compiled extension and runs exactly the code of an
# installation without it; the tests that need the kernels (marker `kernels`) skip, saying so.  CI runs it.
test-reference: install
	LGM_EXT_DISABLE_KERNELS=1 $(PY) -m pytest -q -m "not slow" -p no:cacheprovider

test-all: install
	$(PY) -m pytest -q

# ruff (configured in pyproject.toml); the test suite runs it too (tests/test_layout.py).
lint: install
	$(VENV)/bin/ruff check .

# The documentation site (mkdocs.yml; pages in docs/), offline, warnings as errors: open site/index.html.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site
	@echo "site: site/index.html"

bench: install
	$(PY) benchmarks/bench_lgm.py --write
	$(PY) benchmarks/bench_pgd.py --write

# A GPU machine in one command (docs/CUDA.md): with the machine's own Python and torch (no venv, no network),
# build in place for its GPU, run the `cuda` tests, the GPU benchmarks and the rest of the suite within
# GPU_CHECK_SECONDS; summary.md and results.json in GPU_CHECK_OUT.  Without a GPU it checks the build, says
# "no GPU: CUDA tests and benchmarks skipped" and exits 0 (CI runs it so).  COMMIT= names the commit where
# the copy has no .git.
GPU_CHECK_SECONDS ?= 450
GPU_CHECK_OUT     ?= build/gpu-check
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) --seconds $(GPU_CHECK_SECONDS) $(if $(COMMIT),--commit $(COMMIT))

# The C++ under AddressSanitizer and UndefinedBehaviorSanitizer: a copy of the sources in SANITIZE_DIR (never the
# normal build) built CPU-only with -fsanitize=address,undefined -- the CPU loops and the SIMT executor running
# the CUDA kernels -- then the operator, dtype, attack, detector and executor tests on it.  Python is not
# instrumented, so libasan is preloaded; leak checks are off (CPython's arenas).  docs/CUDA.md has its time.
SANITIZE_DIR   ?= build/sanitize
SANITIZE_MARK  := .lgm-sanitize-copy
SANITIZE_TESTS ?= tests/test_simt.py tests/test_pgd_step.py tests/test_attacks.py tests/test_detector.py tests/test_lgm_ops.py \
                  tests/test_dtypes.py
# (the gradchecks, torch.compile, opcheck and the largest shapes left out: under ASan the executor is ~10x slower)
SANITIZE_PYTEST ?= -x -q --capture=sys -m "not slow" \
  -k "not gradcheck and not compile and not opcheck and not float32_no_worse and not row_and_class_blocks and not many_tiles"
test-sanitize:
	@if [ -d $(SANITIZE_DIR)/src ] && [ -n "$$(ls -A $(SANITIZE_DIR)/src)" ] && [ ! -f $(SANITIZE_DIR)/src/$(SANITIZE_MARK) ]; \
	then echo "SANITIZE_DIR=$(SANITIZE_DIR): $(SANITIZE_DIR)/src is not a copy that make test-sanitize made; give another SANITIZE_DIR (nothing was changed)" >&2; exit 2; fi
	@mkdir -p $(SANITIZE_DIR)/src && touch $(SANITIZE_DIR)/src/$(SANITIZE_MARK)
	rm -rf $(SANITIZE_DIR)/src/csrc $(SANITIZE_DIR)/src/lgm_ext $(SANITIZE_DIR)/src/lgm_lab $(SANITIZE_DIR)/src/lgm_cli $(SANITIZE_DIR)/src/tests
	cp -rp setup.py pyproject.toml csrc lgm_ext lgm_lab lgm_cli tests $(SANITIZE_DIR)/src/
	rm -f $(SANITIZE_DIR)/src/lgm_ext/_C*.so $(SANITIZE_DIR)/src/lgm_ext/_simt*.so
	cd $(SANITIZE_DIR)/src && LGM_EXT_REQUIRE_BUILD=1 LGM_EXT_CPU_ONLY=1 MAX_JOBS=$(JOBS) \
	  LGM_EXT_EXTRA_CXXFLAGS="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined" \
	  LGM_EXT_EXTRA_LDFLAGS="-fsanitize=address,undefined" \
	  $(abspath $(PY)) setup.py -q build_ext --inplace --build-temp ../temp > ../build.log 2>&1 \
	  || { tail -n 40 ../build.log; exit 1; }
	cd $(SANITIZE_DIR)/src && LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  OMP_NUM_THREADS=1 PYTHONPATH=. $(abspath $(PY)) -m pytest -p no:cacheprovider $(SANITIZE_PYTEST) $(SANITIZE_TESTS)

# Every kernel mutant of tests/test_simt_mutation.py (lane offset, missing barrier, stride, grid rounding, loop
# bounds, swapped bounds, wrong output index, dropped write, ...): each built into the executor's module and
# required to fail the fast emulated tests.  Not in CI (docs/CUDA.md has the time of one round).
mutation-check: install
	LGM_MUTATION_CHECK=1 $(PY) -m pytest -q -m slow -p no:cacheprovider tests/test_simt_mutation.py

clean:
	rm -rf build site lgm_ext/_C*.so lgm_ext/_simt*.so *.egg-info
