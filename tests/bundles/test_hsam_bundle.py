"""The hsam_finetune bundle: train on a datalist and segment held-out volumes, two ranks, the UNet / UNETR baseline
overlays, and training from the feature cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.bundles.hsam_helpers import BUNDLE, REPO, run_bundle


def test_bundle_trains_on_a_datalist_and_segments_held_out_volumes(tmp_path, tiny_phantom_manifest):
    manifest = json.loads(Path(tiny_phantom_manifest).read_text())
    phantoms = [c for c in manifest["cases"] if c["kind"] == "phantom"]
    items = [{"image": c["path"], "label": c["lungs"], "case_id": c["id"]} for c in phantoms]
    items.append({"image": phantoms[0]["path"], "label": str(tmp_path / "gone.nii.gz"), "case_id": "gone"})
    (tmp_path / "datalist.json").write_text(json.dumps({"training": items[1:], "validation": items[:1]}))
    ckpt = tmp_path / "models" / "model.pt"
    train = run_bundle(
        [
            "--config_file",
            str(BUNDLE / "configs" / "train.json"),
            "--datalist_path",
            str(tmp_path / "datalist.json"),
            "--sam_variant",
            "tiny_sam",
            "--sam_random_init",
            "true",
            "--slice_size",
            "64",
            "--max_epochs",
            "2",
            "--batch_size",
            "4",
            "--num_workers",
            "0",
            "--output_dir",
            str(tmp_path / "train"),
            "--ckpt_path",
            str(ckpt),
            "--boundary_ignore_px",
            "2",
            "--tracking",
            "mlflow",
            "--experiment_name",
            "hsam_test",
        ]
    )
    assert train.returncode == 0, train.stderr[-3000:]
    log = train.stdout + train.stderr
    assert "trainable parameters:" in log and "with full fine-tuning" in log
    assert "case gone skipped" in log and "pseudo label not found" in log
    history = json.loads((tmp_path / "train" / "metrics_history.json").read_text())["history"]
    assert len(history) == 2 and all(0.0 <= h["val_mean_dice"] <= 1.0 for h in history)
    for key in (
        "epoch_loss",
        "epoch_loss_stage1",
        "epoch_loss_stage2",
    ):  # the epoch means the report's loss panel draws
        assert all(np.isfinite(h.get(key, float("nan"))) and h[key] > 0 for h in history), (key, history)
    assert torch.load(ckpt, weights_only=True)["variant"] == "tiny_sam"
    from mlflow.tracking import MlflowClient  # --tracking mlflow: MONAI's default store, output_dir/mlruns.db

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'train' / 'mlruns.db'}")
    run = client.search_runs([client.get_experiment_by_name("hsam_test").experiment_id])[0]
    assert (
        run.data.params["sam_variant"] == "tiny_sam"
        and run.data.params["boundary_ignore_px"] == "2"
        and run.data.params["skipped_cases"] == "1"
    )
    assert int(run.data.params["params_trainable"]) < int(run.data.params["params_full_finetuning"])
    assert [h.step for h in client.get_metric_history(run.info.run_id, "val_mean_dice")] == [1, 2]

    out = tmp_path / "eval"
    cases = json.dumps(
        [
            {"image": phantoms[0]["path"], "lungs": phantoms[0]["lungs"], "case_id": "tiny_0"},
            {"image": str(tmp_path / "no_scan.nii.gz"), "lungs": phantoms[0]["lungs"], "case_id": "no_scan"},
        ]
    )
    args = [
        "--config_file",
        f"['{BUNDLE / 'configs' / 'inference.json'}','{BUNDLE / 'configs' / 'evaluate.json'}']",
        "--ckpt_path",
        str(ckpt),
        "--network_def#random_init",
        "true",
        "--cases",
        f"${cases}",
        "--output_dir",
        str(out),
        "--progress",
        "false",
    ]
    run = run_bundle(args)
    assert run.returncode == 0, run.stderr[-3000:]
    scores = json.loads((out / "scores.json").read_text())
    assert [c["case_id"] for c in scores["cases"]] == ["tiny_0"] and 0.0 <= scores["cases"][0]["dice"] <= 1.0
    assert "hd95_mm" in scores["cases"][0] and "dice_central" in scores["cases"][0]
    assert json.loads((out / "failed.json").read_text())["failed"] == [
        {"case": str(tmp_path / "no_scan.nii.gz"), "reason": "file not found"}
    ]
    mask = nib.load(str(out / "tiny_0" / "tiny_0_lung_mask.nii.gz"))
    assert mask.shape == (64, 64, 32) and np.allclose(mask.affine, nib.load(phantoms[0]["path"]).affine)
    report = json.loads((out / "tiny_0" / "tiny_0_report.json").read_text())
    assert {"lung_volume_ml", "mean_lung_hu", "percent_lung_below_950_hu"} <= set(report)

    wrong = run_bundle(args[:-4] + ["--sam_variant", "litemedsam", "--output_dir", str(tmp_path / "wrong")])
    assert wrong.returncode != 0 and "trained on the tiny_sam backbone, not litemedsam" in wrong.stderr


@pytest.mark.timeout(300)
def test_two_rank_training_keeps_the_ranks_weights_equal(tmp_path, tiny_phantom_manifest):
    """multi_gpu_train.json under torchrun with 2 CPU ranks (gloo): DDP keeps every trained tensor equal."""
    import os

    manifest = json.loads(Path(tiny_phantom_manifest).read_text())
    items = [
        {"image": c["path"], "label": c["lungs"], "case_id": c["id"]}
        for c in manifest["cases"]
        if c["kind"] == "phantom"
    ]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": items[1:], "validation": items[:1]}))
    dump = f"$torch.save(common.engines.clip.unwrap(@network).trainable_state_dict(), '{tmp_path}/rank' + os.environ['RANK'] + '.pt')"
    configs = [str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "multi_gpu_train.json")]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        repr(configs),
        "--bundle_root",
        str(BUNDLE),
        "--datalist_path",
        str(tmp_path / "datalist.json"),
        "--sam_variant",
        "tiny_sam",
        "--sam_random_init",
        "true",
        "--slice_size",
        "64",
        "--max_epochs",
        "1",
        "--batch_size",
        "2",
        "--num_workers",
        "0",
        "--output_dir",
        str(tmp_path / "train"),
        "--ckpt_path",
        str(tmp_path / "model.pt"),
        "--finalize",
        repr([dump, "$torch.distributed.destroy_process_group()"]),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert set(ranks[0]) == set(ranks[1]) and any("lora_" in k for k in ranks[0])
    assert [k for k in ranks[0] if not torch.equal(ranks[0][k], ranks[1][k])] == []
    assert torch.load(tmp_path / "model.pt", weights_only=True)["variant"] == "tiny_sam"  # rank 0 saved the best model


@pytest.mark.parametrize("baseline", ["unet", "unetr"])
def test_baseline_overlays_train_and_score_with_the_same_recipe(tmp_path, tiny_phantom_manifest, baseline):
    """baseline_unet.json / baseline_unetr.json swap only the network: same trainer, loss, data and scoring."""
    manifest = json.loads(Path(tiny_phantom_manifest).read_text())
    phantoms = [c for c in manifest["cases"] if c["kind"] == "phantom"]
    items = [{"image": c["path"], "label": c["lungs"], "case_id": c["id"]} for c in phantoms]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": items[1:], "validation": items[:1]}))
    overlay = str(BUNDLE / "configs" / f"baseline_{baseline}.json")
    ckpt = tmp_path / f"{baseline}.pt"
    train = run_bundle(
        [
            "--config_file",
            f"['{BUNDLE / 'configs' / 'train.json'}','{overlay}']",
            "--datalist_path",
            str(tmp_path / "datalist.json"),
            "--slice_size",
            "32",
            "--max_epochs",
            "1",
            "--batch_size",
            "4",
            "--num_workers",
            "0",
            "--output_dir",
            str(tmp_path / "train"),
            "--ckpt_path",
            str(ckpt),
        ]
    )
    assert train.returncode == 0, train.stderr[-3000:]
    history = json.loads((tmp_path / "train" / "metrics_history.json").read_text())["history"]
    assert len(history) == 1 and 0.0 <= history[0]["val_mean_dice"] <= 1.0
    assert np.isfinite(history[0]["epoch_loss"]) and history[0]["epoch_loss"] == pytest.approx(
        history[0]["epoch_loss_stage2"]
    )  # one stage
    saved = torch.load(ckpt, weights_only=True)  # the whole baseline network, named, not an H-SAM record
    assert saved["format"] == "state_dict" and saved["network"] == {"unet": "UNet", "unetr": "UNETR"}[baseline]

    out = tmp_path / "eval"
    cases = json.dumps([{"image": phantoms[0]["path"], "lungs": phantoms[0]["lungs"], "case_id": "tiny_0"}])
    run = run_bundle(
        [
            "--config_file",
            f"['{BUNDLE / 'configs' / 'inference.json'}','{BUNDLE / 'configs' / 'evaluate.json'}','{overlay}']",
            "--slice_size",
            "32",
            "--ckpt_path",
            str(ckpt),
            "--cases",
            f"${cases}",
            "--output_dir",
            str(out),
            "--progress",
            "false",
        ]
    )
    assert run.returncode == 0, run.stderr[-3000:]
    scores = json.loads((out / "scores.json").read_text())
    assert [c["case_id"] for c in scores["cases"]] == ["tiny_0"] and 0.0 <= scores["cases"][0]["dice"] <= 1.0
    mask = nib.load(str(out / "tiny_0" / "tiny_0_lung_mask.nii.gz"))
    assert mask.shape == (64, 64, 32) and np.allclose(mask.affine, nib.load(phantoms[0]["path"]).affine)


def test_bundle_trains_from_the_feature_cache(tmp_path, tiny_phantom_manifest):
    manifest = json.loads(Path(tiny_phantom_manifest).read_text())
    phantoms = [c for c in manifest["cases"] if c["kind"] == "phantom"]
    items = [{"image": c["path"], "label": c["lungs"], "case_id": c["id"]} for c in phantoms]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": items[1:], "validation": items[:1]}))
    ckpt = tmp_path / "model.pt"
    train = run_bundle(
        [
            "--config_file",
            str(BUNDLE / "configs" / "train.json"),
            "--datalist_path",
            str(tmp_path / "datalist.json"),
            "--sam_variant",
            "tiny_sam",
            "--sam_random_init",
            "true",
            "--slice_size",
            "64",
            "--max_epochs",
            "2",
            "--batch_size",
            "4",
            "--num_workers",
            "0",
            "--output_dir",
            str(tmp_path / "train"),
            "--ckpt_path",
            str(ckpt),
            "--feature_cache_dir",
            str(tmp_path / "cache"),
            "--feature_cache_views",
            "2",
        ]
    )
    assert train.returncode == 0, train.stderr[-3000:]
    history = json.loads((tmp_path / "train" / "metrics_history.json").read_text())["history"]
    assert len(history) == 2 and all(np.isfinite(h["epoch_loss"]) for h in history)
    assert len(list((tmp_path / "cache").glob("*_v1.pt"))) > 0 and ckpt.is_file()
