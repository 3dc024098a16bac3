# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
# Each creates .venv in the repository and installs into it when needed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   := data/default/manifest.json

.PHONY: install data demo release test test-fast segment serve benchmark ablation probmap sweep pseudolabel pseudolabel-ablation hsam-data hsam hsam-baselines hsam-comparison clean

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
# real scans and training phantoms, then the label-free real-CT table of the bundle docs.
# RELEASE_ARGS="--clip-ckpt bundles/foundation_clip/models/model.pt" re-trains H-SAM on the shipped SA-1 model
RELEASE_ARGS ?=
release: $(DATA)
	$(PY) -m common.apps.release --out outputs/release $(RELEASE_ARGS)
	$(PY) -m monai.bundle run --config_file bundles/hsam_finetune/configs/inference.json --bundle_root bundles/hsam_finetune \
		--dataset_dir ../shared/data --output_dir outputs/release/hsam/shared
	$(PY) -m monai.bundle run --config_file bundles/hsam_finetune/configs/inference.json --bundle_root bundles/hsam_finetune \
		--dataset_dir data/default/pyradiomics --output_dir outputs/release/hsam/pyradiomics
	$(PY) benchmarks/real_ct_labelfree.py --scans ../shared/data --method H-SAM=outputs/release/hsam/shared \
		--method SA-2=outputs/release/probmap/shared --method SA-3a=outputs/release/pseudolabel/shared --probmap-dir outputs/release/probmap/shared --out outputs/release/labelfree/shared --overlays
	$(PY) benchmarks/real_ct_labelfree.py --scans data/default/pyradiomics --method H-SAM=outputs/release/hsam/pyradiomics \
		--method SA-2=outputs/release/probmap/pyradiomics --method SA-3a=outputs/release/pseudolabel/pyradiomics --probmap-dir outputs/release/probmap/pyradiomics --out outputs/release/labelfree/pyradiomics --overlays

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

benchmark: $(DATA)
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/clip_train.py
	$(PY) benchmarks/probmap_speed.py --ckpt $(CLIP_CKPT)
	$(PY) benchmarks/pseudolabel_speed.py --probmap-dir outputs/probmap/real

# SA-2 maps of the real shared scans, then scores on three held-out phantoms (needs an SA-1 checkpoint: make demo)
probmap: $(DATA)
	$(PY) -m monai.bundle run --config_file bundles/probmap/configs/inference.json --bundle_root bundles/probmap \
		--ckpt_path $(CLIP_CKPT) --dataset_dir ../shared/data --output_dir outputs/probmap/real
	$(PY) -m monai.bundle run --config_file "['bundles/probmap/configs/inference.json','bundles/probmap/configs/evaluate.json']" \
		--bundle_root bundles/probmap --ckpt_path $(CLIP_CKPT) --output_dir outputs/probmap/heldout_phantoms

# SA-3 pseudo labels of the real shared scans and of the held-out phantoms (scored), from make probmap's outputs
pseudolabel: $(DATA)
	$(PY) -m monai.bundle run --config_file bundles/pseudolabel/configs/inference.json --bundle_root bundles/pseudolabel \
		--dataset_dir ../shared/data --probmap_dir outputs/probmap/real --output_dir outputs/pseudolabel/real
	$(PY) -m monai.bundle run --config_file "['bundles/pseudolabel/configs/inference.json','bundles/pseudolabel/configs/evaluate.json']" \
		--bundle_root bundles/pseudolabel --probmap_dir outputs/probmap/heldout_phantoms --output_dir outputs/pseudolabel/heldout_phantoms

# dots vs boxes vs both, with and without auxiliary channels, on the held-out phantoms
pseudolabel-ablation: $(DATA)
	$(PY) benchmarks/pseudolabel_ablation.py --probmap-dir outputs/probmap/heldout_phantoms

sweep: $(DATA)
	$(PY) benchmarks/probmap_sweep.py --ckpt $(CLIP_CKPT)

# SA-1 loss ablation (4 demo-size trainings, about 30 minutes on 2 CPU cores)
ablation: $(DATA)
	$(PY) benchmarks/clip_ablation.py

# SA-3b on CPU, in order: make demo, make probmap, make pseudolabel, make hsam-data, make hsam,
# make hsam-baselines, make hsam-comparison. Training pseudo labels come from phantoms that neither SA-1
# nor any score uses (seeds 200-202) and from the real scans that passed QC; scores are on the held-out
# phantoms 100-102. HSAM_CONFIG=train keeps the real (GPU) sizes; demo is the CPU size.
HSAM_TRAIN_PHANTOMS ?= data/default/phantoms_hsam_train
HSAM_CONFIG ?= demo
hsam-data: $(DATA)
	$(PY) -m monai.bundle run --config_file "['bundles/probmap/configs/inference.json','bundles/probmap/configs/evaluate.json']" \
		--bundle_root bundles/probmap --ckpt_path $(CLIP_CKPT) --phantom_dir $(HSAM_TRAIN_PHANTOMS) --phantom_seed 200 \
		--phantom_prefix train_phantom --output_dir outputs/probmap/train_phantoms
	$(PY) -m monai.bundle run --config_file "['bundles/pseudolabel/configs/inference.json','bundles/pseudolabel/configs/evaluate.json']" \
		--bundle_root bundles/pseudolabel --phantom_dir $(HSAM_TRAIN_PHANTOMS) --phantom_seed 200 --phantom_prefix train_phantom \
		--probmap_dir outputs/probmap/train_phantoms --output_dir outputs/pseudolabel/train_phantoms

HSAM_DATALIST ?= ['outputs/pseudolabel/train_phantoms/datalist.json','outputs/pseudolabel/real/datalist.json']
HSAM_OVERLAYS = 'bundles/hsam_finetune/configs/train.json'$(if $(filter demo,$(HSAM_CONFIG)),$(comma)'bundles/hsam_finetune/configs/demo.json')
comma := ,
# its own checkpoint: the demo's (HSAM_CKPT, what segment and serve use by default) stays the demo's
HSAM_CHAIN_CKPT ?= outputs/hsam_finetune/models/model.pt
hsam: $(DATA)
	$(PY) -m monai.bundle run --config_file "[$(HSAM_OVERLAYS)]" --bundle_root bundles/hsam_finetune \
		--datalist_path "$(HSAM_DATALIST)" --ckpt_path $(HSAM_CHAIN_CKPT) --output_dir outputs/hsam_finetune/train
	$(PY) -m monai.bundle run --config_file "['bundles/hsam_finetune/configs/inference.json','bundles/hsam_finetune/configs/evaluate.json']" \
		--bundle_root bundles/hsam_finetune --ckpt_path $(HSAM_CHAIN_CKPT) --output_dir outputs/hsam_finetune/heldout_phantoms

# baselines on the same held-out phantoms: LiteMedSAM with SA-2 boxes and no fine-tuning (Algorithm 2 without
# the map fallback), and MONAI UNet / UNETR trained on the same datalist with the same recipe
hsam-baselines: $(DATA)
	$(PY) -m monai.bundle run --config_file "['bundles/pseudolabel/configs/inference.json','bundles/pseudolabel/configs/evaluate.json']" \
		--bundle_root bundles/pseudolabel --probmap_dir outputs/probmap/heldout_phantoms --fallback none --output_dir outputs/hsam_comparison/untuned_sam
	for b in unet unetr; do \
	  $(PY) -m monai.bundle run --config_file "[$(HSAM_OVERLAYS),'bundles/hsam_finetune/configs/baseline_$$b.json']" \
		--bundle_root bundles/hsam_finetune --datalist_path "$(HSAM_DATALIST)" --output_dir outputs/hsam_comparison/train_$$b \
		--ckpt_path outputs/hsam_comparison/train_$$b/model.pt || exit 1; \
	  $(PY) -m monai.bundle run --config_file "['bundles/hsam_finetune/configs/inference.json','bundles/hsam_finetune/configs/evaluate.json','bundles/hsam_finetune/configs/baseline_$$b.json']" \
		--bundle_root bundles/hsam_finetune --ckpt_path outputs/hsam_comparison/train_$$b/model.pt --output_dir outputs/hsam_comparison/$$b || exit 1; \
	done

# the comparison table (markdown, CSV, plot) of every method on the held-out phantoms
hsam-comparison: $(DATA)
	$(PY) benchmarks/hsam_comparison.py

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
