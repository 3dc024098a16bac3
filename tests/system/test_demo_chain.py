"""The whole ``make demo`` chain at its smallest size, as a user runs it: ``python -m common.apps.demo --size smoke``
from a clean output folder. Every step (ingest, SA-1, SA-2, SA-3a, SA-3b, report) runs for real, each learning and
inference step through ``python -m monai.bundle run`` with MLflow tracking (each its own process, forked from the
demo's preloaded server and run as ``python -m`` runs a module: common.apps.pipeline.run_python), on tiny phantoms and a real DeepLesion
scan with tiny random networks (the ``smoke`` size of common.apps.demo.SIZES), so that a chain that breaks between
stages (a renamed output, a config key, a datalist the next stage cannot read) fails here and not in a 30-minute demo.
The method's quality is not tested here: the stages' own tests and ``make demo`` do that.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("chain") / "demo"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "common.apps.demo", "--size", "smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return out, result, time.perf_counter() - started


def test_every_step_runs_through_monai_bundle_run_and_the_report_is_written(smoke_run):
    from common.apps.demo import SIZES, demo_steps

    out, result, seconds = smoke_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    expected = [s.name for s in demo_steps(out, SIZES["smoke"])]
    assert [s["name"] for s in metrics["steps"]] == expected
    assert {s["stage"] for s in metrics["steps"]} == {"clip", "probmap", "pseudolabel", "hsam"}
    assert all(s["status"] == "ran" and s["seconds"] > 0 for s in metrics["steps"]), metrics["steps"]
    assert all(f"{sys.executable} -m monai.bundle run --config_file" in s["command"] for s in metrics["steps"])
    assert metrics["failure"] is None and metrics["size"] == "smoke"
    # ingest: the smoke manifest's real DeepLesion scan and two tiny phantoms, read and QC'd
    assert metrics["ingest"]["n_cases"] == 3 and metrics["ingest"]["n_passed"] == 3, metrics["ingest"]
    # every stage's section was built from its bundle's own outputs
    assert all(metrics[s]["ran"] for s in ("clip", "probmap", "pseudolabel", "hsam")), {
        s: metrics[s].get("error") for s in ("clip", "probmap", "pseudolabel", "hsam")
    }
    assert 0.0 <= metrics["hsam"]["heldout_phantoms"]["dice"]["mean"] <= 1.0
    assert metrics["hsam"]["comparison"]["summary"], "the held-out phantom comparison table is empty"
    # H-SAM trained on the pseudo labels of the real scan and of the phantom (QC admits all at this size)
    assert sorted(sum(metrics["pseudolabel"]["hsam_datalist"].values(), [])) == [
        "deeplesion_000001_01_01",
        "train_phantom_000_ct",
    ]
    assert (out / "hsam_finetune" / "models" / "model.pt").is_file() and (
        out / "foundation_clip" / "models" / "model.pt"
    ).is_file()
    assert (out / "report" / "index.html").is_file() and "SA-3b hsam_finetune" in result.stdout
    print(f"smoke chain: {seconds:.0f} s")


def test_each_step_is_an_mlflow_run_in_the_demo_store(smoke_run):
    from mlflow.tracking import MlflowClient

    out, result, _ = smoke_run
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    names = json.loads((out / "report" / "metrics.json").read_text())["steps"]
    assert sorted(r.info.run_name for r in runs) == sorted(s["name"] for s in names)
    assert all(r.info.status == "FINISHED" for r in runs)
    train = next(r for r in runs if r.info.run_name == "hsam_finetune_train")
    assert "val_mean_dice" in train.data.metrics and train.data.params["sam_variant"] == "tiny_sam"


def test_a_real_scan_missing_from_the_manifest_is_a_one_line_error(tmp_path):
    """A size that names a real scan make data did not list stops before any step, naming the manifest and the scan."""
    import dataclasses

    from common.apps.demo import SIZES, prepare_scans
    from common.io import write_json_atomic

    write_json_atomic(tmp_path / "data" / "manifest.json", {"cases": []})
    size = dataclasses.replace(SIZES["smoke"], training_phantoms=0, real_training=("lidc_idri_9999",))
    with pytest.raises(ValueError, match=r"manifest.json: the demo's real scan lidc_idri_9999 is not listed"):
        prepare_scans(tmp_path / "out", size, tmp_path / "data")
