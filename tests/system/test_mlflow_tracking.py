"""``--tracking mlflow`` on the case-by-case stages: probmap and pseudolabel evaluation runs logged into
one shared store, read back with ``MlflowClient`` (score means as metrics, reports and overlays as artifacts)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BUNDLES
from tests.bundles.test_pseudolabel import _write_probmap_outputs

REPO = BUNDLES.parent
EXPERIMENT = "lungct_tracking"


def _bundle(bundle: str, overrides: dict) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` of ``bundle``'s inference.json + evaluate.json with ``--tracking mlflow``."""
    configs = [str(BUNDLES / bundle / "configs" / c) for c in ("inference.json", "evaluate.json")]
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        json.dumps(configs),
        "--bundle_root",
        str(BUNDLES / bundle),
        "--tracking",
        "mlflow",
    ]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    files = []
    for a in client.list_artifacts(run_id, path):
        files += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return files


def _thin_phantom(c: dict, folder: Path) -> dict:
    """The tiny phantom cut to six axial slices through the lungs (LiteMedSAM costs about 1 s a slice on CPU)."""
    import nibabel as nib
    import numpy as np

    from common.io.nifti import save_nifti_array

    folder.mkdir(parents=True, exist_ok=True)
    case = {"case_id": "thin_phantom"}
    for key, src, dtype in (
        ("image", c["path"], np.int16),
        ("label", c["label"], np.uint8),
        ("lungs", c["lungs"], np.uint8),
    ):
        img = nib.load(src)
        case[key] = str(
            save_nifti_array(
                np.asarray(img.dataobj)[:, :, 12:18], img.affine, folder / f"thin_phantom_{key}.nii.gz", dtype
            )
        )
    return case


def test_evaluation_stages_log_score_means_and_outputs_into_one_store(tmp_path, tiny_clip, tiny_phantom_manifest):  # noqa: F811
    from mlflow.tracking import MlflowClient
    from monai.bundle import run

    _, ckpt = tiny_clip
    phantom = [c for c in json.loads(tiny_phantom_manifest.read_text())["cases"] if c["kind"] == "phantom"][0]
    case = _thin_phantom(phantom, tmp_path / "data")
    store = tmp_path / "store" / "mlruns.db"  # one store for both stages, outside either output_dir
    tracking = {"tracking_uri": f"sqlite:///{store}", "experiment_name": EXPERIMENT}

    # SA-2 evaluation, the tiny CLIP against the phantom's label map: monai.bundle.run in this process,
    # what `python -m monai.bundle run ... --tracking mlflow` calls
    pm_out = tmp_path / "probmap_eval"
    run(
        config_file=[str(BUNDLES / "probmap" / "configs" / c) for c in ("inference.json", "evaluate.json")],
        bundle_root=str(BUNDLES / "probmap"),
        tracking="mlflow",
        run_name="probmap",
        ckpt_path=str(ckpt),
        output_dir=str(pm_out),
        datalist=[case],
        device="cpu",
        progress=False,
        stride_mm=40.0,
        **tracking,
    )

    # SA-3a evaluation against the phantom's lungs, on the command line; the lung field stands in for the SA-2 mask
    sa2, pl_out = tmp_path / "sa2", tmp_path / "pseudolabel_eval"
    _write_probmap_outputs(sa2, case["case_id"], Path(case["image"]), Path(case["label"]))
    cases = [{k: case[k] for k in ("image", "lungs", "case_id")}]
    proc = _bundle(
        "pseudolabel",
        {
            "dataset_dir": tmp_path / "data",
            "probmap_dir": sa2,
            "output_dir": pl_out,
            "cases": f"${json.dumps(cases)}",
            "device": "cpu",
            "progress": False,
            "run_name": "pseudolabel",
            **tracking,
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"probmap", "pseudolabel"}
    expected = {
        "probmap": (pm_out, ("lung_dice", "lung_mask_dice"), f"{case['case_id']}_overlay.png"),
        "pseudolabel": (pl_out, ("pseudo_dice", "sa2_mask_dice"), f"{case['case_id']}_pseudo_overlay.png"),
    }
    for name, (out, dice_keys, overlay) in expected.items():
        r = runs[name]
        assert r.info.status == "FINISHED"
        summary = json.loads((out / "scores.json").read_text())["summary"]
        for key in dice_keys:  # the score means reach MLflow as metrics, equal to scores.json's
            value = r.data.metrics[key]
            assert math.isfinite(value) and 0.0 <= value <= 1.0
            assert value == pytest.approx(summary[key]["mean"])
        assert (r.data.metrics["cases_done"], r.data.metrics["cases_failed"]) == (1, 0)  # run counts, labelled or not
        assert r.data.metrics["mean_seconds_per_case"] > 0
        artifacts = _artifacts(client, r.info.run_id)
        assert any(Path(a).name.startswith("config_") and a.endswith(".json") for a in artifacts)  # the executed config
        assert {"outputs/scores.json", "outputs/scores.csv", f"outputs/{case['case_id']}/{overlay}"} <= set(artifacts)
        assert not [a for a in artifacts if a.endswith((".nii", ".nii.gz", ".db"))]  # no volumes, not the store itself
    pl_artifacts = set(_artifacts(client, runs["pseudolabel"].info.run_id))
    assert {
        "outputs/datalist.json",
        "outputs/qc.json",
        "outputs/qc.csv",
    } <= pl_artifacts  # written by the merge step after the evaluator
    assert f"outputs/{case['case_id']}/{case['case_id']}_pseudolabel.json" in pl_artifacts
    logged = json.loads(
        Path(client.download_artifacts(runs["probmap"].info.run_id, "outputs/scores.json", str(tmp_path))).read_text()
    )
    assert logged == json.loads((pm_out / "scores.json").read_text())


def test_artifacts_handler_is_a_no_op_without_an_mlflow_handler(tmp_path):
    """A plain run (no ``--tracking``): nothing to log into, nothing fails."""
    from ignite.engine import Engine

    from common.engines.handlers import MLflowArtifactsHandler

    (tmp_path / "scores.json").write_text("{}")
    handler = MLflowArtifactsHandler(output_dir=tmp_path)
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    assert handler.runs == [] and handler.log_outputs() == 0
    assert handler.files() == [tmp_path / "scores.json"]
