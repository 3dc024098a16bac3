# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
# Each creates .venv in the repository and installs into it when needed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   := data/default/manifest.json

.PHONY: install data demo test segment serve benchmark ablation probmap sweep pseudolabel pseudolabel-ablation clean

CLIP_CKPT ?= outputs/demo/foundation_clip/models/model.pt

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch 2.14.1 + torchvision 0.29.1 come from this machine's local wheels (CUDA build, runs on CPU)
	$(PY) -m pip install --quiet -e . versioneer
	@touch $(STAMP)

install: $(STAMP)

$(DATA): $(STAMP) common/default_data.py common/phantom.py
	$(PY) -m common.default_data

data: $(DATA)

demo: $(DATA)
	$(PY) -m common.demo --out outputs/demo

test: $(DATA)
	$(PY) -m pytest -q tests

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

segment:
	@echo "make segment: not built yet. It needs the probmap and hsam_finetune stages (issues 4-6) on top of foundation_clip." >&2
	@exit 2

serve:
	@echo "make serve: not built yet. The MONAI Label server comes with the end-to-end issue once the bundles exist (issue 7)." >&2
	@exit 2

clean:
	rm -rf outputs .pytest_cache
