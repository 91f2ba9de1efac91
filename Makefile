# mpifed: `make demo` and `make test` work on a fresh clone; they install into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MPIEXEC := $(VENV)/bin/mpiexec
# Every MPI test run has a wall-clock limit: a hang is a failure, not a wait.
MPI_TIMEOUT ?= 600
NP ?= 2
export OMP_NUM_THREADS ?= 1

.PHONY: install test test-serial test-unit test-launcher test-mpi test-multinode test-slurm test-gpu \
        test-openmpi test-openmpi-run demo demo-gpt bench lint docs docs-reference figures clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,mpich]'
	touch $@

# Tests by kind, a folder each: tests/unit (one process, no launcher), tests/launcher (mpiexec
# or the CLI in a subprocess), tests/mpi (pytest under mpiexec; mpi(min_size=N) names the ranks
# a test needs), tests/gpu, tests/multinode, tests/slurm. test-serial lists its 20 slowest
# tests: CI's time is kept under its 40-minute limit from that list.
test: test-serial test-mpi

test-serial: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=20 -m "not slurm and not multinode" \
	  tests/unit tests/launcher tests/gpu

test-unit: install
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

test-launcher: install
	$(PY) -m pytest -q -p no:cacheprovider tests/launcher

test-mpi: install
	@for n in 1 2 3 4; do \
	  echo "== MPI tests on $$n ranks"; \
	  timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) -n $$n $(PY) -m pytest -q -p no:cacheprovider \
	    --with-mpi -m mpi tests/mpi || exit 1; \
	done

# Several nodes for real on this host: MPICH splits the ranks into nodes (MPIR_CVAR_NUM_CLIQUES),
# shared memory inside one, libfabric's TCP provider over loopback (FI_TCP_IFACE=lo) between
# them. The MPI suite on 2 nodes x 2 ranks and 3 nodes x 1 rank, then tests/multinode/test_multinode.py
# (collectives, training, a federation across nodes, a lost node and its resumption, training over
# a 1 Gbit/s link shaped by mpifed.shaped_link, skipped with the reason where it cannot run).
MULTINODE_ENV = MPIR_CVAR_CLIQUES_BY_BLOCK=1 MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp FI_TCP_IFACE=lo
test-multinode: install
	@for cfg in "2 4" "3 3"; do set -- $$cfg; \
	  echo "== MPI tests on $$1 nodes, $$2 ranks (TCP over loopback between nodes)"; \
	  $(MULTINODE_ENV) MPIR_CVAR_NUM_CLIQUES=$$1 timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) -n $$2 \
	    $(PY) -m pytest -q -p no:cacheprovider --with-mpi -m mpi tests/mpi || exit 1; \
	done
	timeout -k 10 $(MPI_TIMEOUT) $(PY) -m pytest -q -p no:cacheprovider -m multinode tests/multinode/test_multinode.py

# The MPI suite (2, 3 and 4 ranks) and the launcher tests again under Open MPI, the MPI of most
# clusters (Debian's openmpi-bin 4.1: no half-precision datatype, its own mpirun): installed
# when missing where this runs as root with apt-get, else SKIPPED. $(OMPI_VENV) holds mpi4py
# built against it (mpicc.openmpi) and an mpiexec link to its launcher; every other package
# comes from $(VENV) through a .pth file read after its own site-packages (no second torch).
# Root may run Open MPI only when told; 4 ranks on a 2-core machine need oversubscription;
# vader's single-copy mode needs ptrace rights that containers often lack; idle ranks yield the
# core (CI machines are shared); PMIx's native security, not munge's: where munge is installed
# but munged is not running (as before `make test-slurm` starts it), PMIx retries its socket
# for 2.3 s at every start (a lone process's daemon and every mpirun).
OMPI_VENV ?= .venv-openmpi
OMPI_PY := $(OMPI_VENV)/bin/python
OMPI_ENV := OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
            OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none \
            OMPI_MCA_mpi_yield_when_idle=1 PMIX_MCA_psec=native
test-openmpi: install
	@if ! command -v mpicc.openmpi >/dev/null || ! command -v mpiexec.openmpi >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "== installing Debian's openmpi-bin and libopenmpi-dev"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null || exit 1; \
	  else \
	    echo "SKIPPED: Open MPI tests (make test-openmpi) need Debian's openmpi-bin and" \
	      "libopenmpi-dev: install them, or run as root with apt-get"; \
	    exit 0; \
	  fi; \
	fi; \
	$(MAKE) --no-print-directory test-openmpi-run

# The whole MPI suite on 2, 3 and 4 ranks (about 35, 55 and 60 s on a 2-core machine), then the
# launcher tests of what the MPI library decides: starting ranks, signals through the launcher,
# kills and resumes, failures ending every rank, stalls, launch mistakes, the same bits under
# both MPIs (about 4 minutes). OMPI_LAUNCHER_TESTS=tests/launcher runs every launcher test
# under Open MPI (about 13 minutes here: each mpirun start costs ~0.3 s more than Hydra's), too
# long for CI beside the MPICH suite; OMPI_MPI_TESTS narrows the MPI part. test_gpt_cli.py (the
# GPT commands and the demo started from Python, as `make demo-gpt` does) runs last: its demo
# passes a copy of the environment, since a singleton MPI started in the pytest process leaves
# Open MPI's variables in the C environment.
OMPI_MPI_TESTS ?= tests/mpi
OMPI_LAUNCHER_TESTS ?= $(addprefix tests/launcher/,test_two_mpis_launch.py test_resume.py \
  test_errors.py test_stall.py test_launch_checks_launch.py test_train_distributed.py \
  test_data_without_mpi.py test_shaped_link_launch.py test_timeline_launch.py \
  test_gpt_cli.py)
OMPI_TIMEOUT ?= 600
test-openmpi-run: $(OMPI_VENV)/.installed
	@for n in 2 3 4; do set -- $(OMPI_MPI_TESTS); \
	  echo "== MPI tests on $$n ranks, Open MPI: $$*"; \
	  $(OMPI_ENV) timeout -k 10 $(OMPI_TIMEOUT) $(OMPI_VENV)/bin/mpiexec -n $$n $(OMPI_PY) -m pytest \
	    -q -p no:cacheprovider --color=no --with-mpi -m mpi "$$@" || exit 1; \
	done
	@echo "== launcher tests, Open MPI (and a training run under both MPIs, bitwise compared)"
	$(OMPI_ENV) MPIFED_OTHER_PYTHON=$(abspath $(PY)) timeout -k 10 1800 $(OMPI_PY) -m pytest -q \
	  -p no:cacheprovider $(OMPI_LAUNCHER_TESTS)

# mpi4py there: PyPI's wheel of the version in $(VENV), whose Open MPI build of the extension
# mpi4py (>= 4.1) picks when the libmpi it loads is Open MPI's (seconds, where compiling takes
# about 4 minutes of CI); MPI4PY_FROM_SOURCE=1 compiles it against mpicc.openmpi instead, as on
# a site without wheels. The .pth runs site.addsitedir, so $(VENV)'s own .pth files (the
# editable mpifed among them) are read too, after this venv's packages.
$(OMPI_VENV)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv $(OMPI_VENV)
	version="$$($(PY) -c 'import mpi4py; print(mpi4py.__version__)')"; \
	if [ -n "$(MPI4PY_FROM_SOURCE)" ]; then \
	  MPICC=mpicc.openmpi $(OMPI_PY) -m pip install --quiet --no-cache-dir --no-binary mpi4py \
	    "mpi4py==$$version"; \
	else \
	  $(OMPI_PY) -m pip install --quiet --only-binary mpi4py "mpi4py==$$version"; \
	fi
	echo "import site; site.addsitedir('$$($(PY) -c 'import site; print(site.getsitepackages()[0])')')" > \
	  "$$($(OMPI_PY) -c 'import site; print(site.getsitepackages()[0])')/zz-mpifed-venv.pth"
	ln -sf "$$(command -v mpiexec.openmpi)" $(OMPI_VENV)/bin/mpiexec
	printf '#!%s\nimport sys\nfrom mpifed.cli.main import main\nsys.exit(main())\n' \
	  "$(abspath $(OMPI_PY))" > $(OMPI_VENV)/bin/mpifed && chmod +x $(OMPI_VENV)/bin/mpifed
	$(OMPI_PY) -c 'from mpi4py import MPI; import mpifed, torch; \
	  assert "Open MPI" in MPI.Get_library_version(), MPI.Get_library_version()'
	touch $@

# The jobs/ scripts under a real single-node SLURM: needs root; installs Debian's slurm-wlm and
# munge when missing and starts munged, slurmctld and slurmd on this host.
test-slurm: install
	tests/slurm/start-local-slurm.sh
	timeout -k 10 900 $(PY) -m pytest -q -p no:cacheprovider -m slurm tests/slurm -rs

# The GPU check in one command (tests/gpu/run.sh, under ten minutes): with the Python found here
# (.venv's, else $(PYTHON)) and no network; WHEELS=dir installs carried wheels first (default
# .whl/ where it exists). Without a GPU it prints "no GPU: skipped" and passes.
test-gpu:
	PYTHON=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) tests/gpu/run.sh $(WHEELS)

demo: install
	$(PY) -m mpifed demo

# A tiny character-level GPT trained on mpifed's own sources on 2 ranks (about a minute), then
# a sample of its text.
demo-gpt: install
	$(PY) -m mpifed demo --gpt

# The all-reduce sweep on NP ranks, then the scaling suite (CSV, JSON, and PNG plots where
# matplotlib is installed, as `make install` does) in bench-out/.
bench: install
	mkdir -p bench-out
	timeout -k 10 1200 $(MPIEXEC) -n $(NP) $(PY) -m mpifed bench allreduce -f 2 --json bench-out/allreduce-$(NP).json
	timeout -k 10 1200 $(PY) -m mpifed bench suite --out bench-out/scaling
	$(PY) -m mpifed plot --allreduce bench-out/allreduce-$(NP).json --out bench-out

# Every figure of the docs (docs/img/*.png), redrawn from the committed benchmark JSON files: the
# scaling suite, the all-reduce sweeps and the held-out model check (tests/unit/test_docs_images.py
# checks that each image exists and is referenced).
FIGURE_JSON = --allreduce docs/allreduce-2.json docs/allreduce-4.json \
  docs/multinode-16core/ar-2x2-ordinary.json docs/multinode-16core/ar-2x2-window.json
figures: install
	$(PY) -m mpifed plot docs/scaling.json $(FIGURE_JSON) --out docs/img
	$(PY) -m mpifed plot docs/multinode-16core/heldout.json --out docs/img

# The configuration reference and JSON Schema, regenerated from mpifed/config/sections.py, and the
# CLI reference from the argument parser (tests fail when the committed ones differ).
docs-reference: install
	$(PY) -m mpifed config reference > docs/reference/configuration.md
	$(PY) -m mpifed config schema > docs/reference/config.schema.json
	$(PY) -m mpifed.cli.reference > docs/reference/cli.md

# The documentation site (mkdocs.yml, pages under docs/) into site/; --strict fails on a broken
# link or a docstring mkdocstrings cannot read.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $@

lint: install
	$(VENV)/bin/ruff check mpifed tests bench

clean:
	rm -rf $(VENV) $(OMPI_VENV) build site *.egg-info .pytest_cache .ruff_cache demo-out bench-out bench-*.json
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
