# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
# Each creates .venv in the repository and installs into it when needed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   := data/default/manifest.json

.PHONY: install data demo release chain test test-fast segment serve clean

# the shipped models (committed); the demo writes its own under outputs/demo
CLIP_CKPT ?= bundles/foundation_clip/models/model.pt
HSAM_CKPT ?= bundles/hsam_finetune/models/model.pt

# Python writes each module's .pyc on first import, into .venv, for every later process: with PYTHONDONTWRITEBYTECODE
# set (as on this machine), each of the demo's dozen processes compiled its imports again (20-28 s each), and
# compiling every installed file at install took 3:42 of set-up against 2:22 without
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch 2.14.1 + torchvision 0.29.1 come from this machine's local wheels (CUDA build, runs on CPU). Not
	# byte-compiled at install: the first process to import a module writes its .pyc (see unexport above)
	# the package with every extra (serve: MONAI Label, track: MLflow, test), torch pinned by constraints.txt
	$(PY) -m pip install --quiet --no-compile -c constraints.txt -e ".[test]" versioneer
	@touch $(STAMP)

install: $(STAMP)

$(DATA): $(STAMP) common/default_data.py $(wildcard common/phantom/*.py)
	$(PY) -m common.default_data

data: $(DATA)

# DEMO_ARGS="--seed 1 --out outputs/demo_seed1": another SA-1 seed (docs/reproducibility.md); "--size smoke": the chain test's size
DEMO_ARGS ?=
demo: $(DATA)
	$(PY) -m common.apps.demo --out outputs/demo $(DEMO_ARGS)

# re-train the shipped models (bundles/foundation_clip and bundles/hsam_finetune models/model.pt) from the shared
# real scans and training phantoms, then the label-free real-CT table of the bundle docs (common/apps/release.py).
# RELEASE_ARGS="--clip-ckpt bundles/foundation_clip/models/model.pt" re-trains H-SAM on the shipped SA-1 model
RELEASE_ARGS ?=
release: $(DATA)
	$(PY) -m common.apps.release --out outputs/release $(RELEASE_ARGS)

# the named experiment chains (common/apps/chains.py): `make chain` lists them, `make chain NAME=sa3b` runs one;
# CHAIN_ARGS="--clip-ckpt outputs/demo/foundation_clip/models/model.pt --hsam-config train --retrain" changes them
NAME ?=
CHAIN_ARGS ?=
chain: $(DATA)
	$(PY) -m common.apps.chains $(if $(NAME),$(NAME),--list) --clip-ckpt "$(CLIP_CKPT)" $(CHAIN_ARGS)

# Debian's Chromium, the real headless browser tests/system/test_browser.py drives through Playwright (tests/conftest.py)
.PHONY: browser
browser:
	@test -x /usr/bin/chromium && exit 0; \
	if ! command -v apt-get >/dev/null 2>&1; then echo "make browser: /usr/bin/chromium is missing and apt-get is not available; install Debian's chromium package by hand" >&2; exit 1; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "make browser: /usr/bin/chromium is missing; run as root (or: sudo apt-get update && sudo apt-get install -y chromium)" >&2; exit 1; fi; \
	echo "make browser: installing Debian's chromium with apt-get"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

test: $(DATA) browser
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q tests

# the library's fast tier (tests/unit, about a minute); make test runs every tier
test-fast: $(DATA)
	$(PY) -m pytest -q tests/unit

# `lungseg` (docs/lungseg.md) with --probmap, so that OUT holds probmap.nii.gz as the design's interface says;
# LUNGSEG_ARGS= (empty) is lungseg's faster default, LUNGSEG_ARGS="--series <UID>" picks a series
LUNGSEG_ARGS ?= --probmap
segment: $(STAMP)
	@test -n "$(CT)" -a -n "$(OUT)" || { echo "usage: make segment CT=<CT file, DICOM folder or folder of cases> OUT=<dir> [CLIP_CKPT=...] [HSAM_CKPT=...] [LUNGSEG_ARGS=...]" >&2; exit 2; }
	$(VENV)/bin/lungseg -i "$(CT)" -o "$(OUT)" --clip-ckpt "$(CLIP_CKPT)" --hsam-ckpt "$(HSAM_CKPT)" $(LUNGSEG_ARGS)

# MONAI Label (its monaibundle sample app) on 127.0.0.1 with the probmap and hsam_finetune bundles and their checkpoints
PORT ?= 8000
serve: $(STAMP)
	@test -n "$(STUDIES)" || { echo "usage: make serve STUDIES=<folder of .nii.gz CT volumes or DICOM series folders> [PORT=8000] [CLIP_CKPT=...] [HSAM_CKPT=...]" >&2; exit 2; }
	$(PY) -m common.apps.serve --studies "$(STUDIES)" --port $(PORT) --clip-ckpt "$(CLIP_CKPT)" --hsam-ckpt "$(HSAM_CKPT)"

clean:
	rm -rf outputs .pytest_cache
