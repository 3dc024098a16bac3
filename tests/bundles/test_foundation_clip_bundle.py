"""The foundation_clip bundle end to end with a tiny model: training, validation metrics, checkpoints,
skipped samples, bad start-up input, MLflow tracking, and the real default models on real CT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import BUNDLES, TINY_CLIP_OVERLAY

CONFIGS = BUNDLES / "foundation_clip" / "configs"


def _workflow(tmp: Path, manifest: Path, text_dir: Path | None, overlays=(TINY_CLIP_OVERLAY,), **overrides):
    from monai.bundle import ConfigWorkflow

    paths = dict(
        samples_dir=str(tmp / "samples"),
        teacher_cache_dir=str(tmp / "cache"),
        output_dir=str(tmp / "out"),
        ckpt_dir=str(tmp / "models"),
    )
    return ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), *map(str, overlays)],
        workflow_type="train",
        logging_file=False,
        bundle_root=str(BUNDLES / "foundation_clip"),
        manifest=str(manifest),
        text_model_dir=str(text_dir) if text_dir else None,
        **{**paths, **overrides},
    )


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


@pytest.fixture(scope="module")
def trained(tiny_phantom_manifest, tiny_text_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip_bundle")
    wf = _workflow(tmp, tiny_phantom_manifest, tiny_text_dir, max_epochs=2)
    wf.initialize()
    wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    wf.finalize()
    return tmp, trainer, evaluator


@pytest.mark.timeout(300)
def test_training_runs_validates_and_saves_the_best_model(trained, tiny_text_dir):
    from common.networks import load_network

    tmp, trainer, evaluator = trained
    assert trainer.state.epoch == 2
    for key in ("epoch_loss", "epoch_loss_contrastive", "epoch_loss_distill"):
        assert np.isfinite(trainer.state.metrics[key]) and trainer.state.metrics[key] > 0, key
    m = evaluator.state.metrics
    assert evaluator.state.key_metric_name == "val_zero_shot_acc"
    assert 0.0 <= m["val_zero_shot_acc"] <= 1.0 and 0.0 < m["val_recall_at_5"] <= 1.0
    assert -1.0 <= m["val_distill_cosine"] <= 1.0
    assert trainer.state.metrics["skipped_samples"] == 0
    history = json.loads((tmp / "out" / "metrics_history.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    assert (
        history[-1]["val_zero_shot_acc"] == m["val_zero_shot_acc"]
        and history[-1]["epoch_loss"] == trainer.state.metrics["epoch_loss"]
    )
    # the checkpoint is the epoch of the best held-out patch accuracy (the first, on a tie)
    best = max(history, key=lambda row: row["val_zero_shot_acc"])
    assert history[-1]["best_epoch"] == evaluator.state.best_metric_epoch == best["epoch"]
    assert evaluator.state.best_metric == best["val_zero_shot_acc"]
    # the teacher cache holds each (slice, view) it was asked for, and the second epoch read from it
    cached = list((tmp / "cache").rglob("*.pt"))
    assert cached, "no teacher embedding cached"
    ckpt = tmp / "models" / "model.pt"
    model = load_network(ckpt)
    assert model.embed_dim == 16 and model.teacher_shape == (256, 4, 4)
    # how training prepared its inputs travels with the weights (inference reads it back)
    assert {k: model.preprocessing[k] for k in ("image_size", "slice_size", "hu_window")} == {
        "image_size": 32,
        "slice_size": 64,
        "hu_window": [-1000.0, 400.0],
    }
    with torch.no_grad():
        assert model.encode_image(torch.rand(2, 1, 32, 32)).shape == (2, 16)
        assert model.encode_text(["CT patch of the lung"]).shape == (1, 16)
    assert not list((tmp / "models").glob("*.tmp*"))  # written whole


@pytest.mark.timeout(300)
def test_evaluate_config_scores_the_saved_best_model(trained, tiny_phantom_manifest, tiny_text_dir):
    """evaluate.json reloads models/model.pt and reproduces the best epoch's validation figures."""
    tmp, _, evaluator = trained
    wf = _workflow(
        tmp,
        tiny_phantom_manifest,
        tiny_text_dir,
        overlays=(TINY_CLIP_OVERLAY, CONFIGS / "evaluate.json"),
        output_dir=str(tmp / "eval"),
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    saved = dict(line.split(",") for line in (tmp / "eval" / "metrics.csv").read_text().splitlines())
    assert float(saved["val_zero_shot_acc"]) == pytest.approx(evaluator.state.best_metric, abs=1e-6)
    assert {"val_recall_at_5", "val_distill_cosine"} <= set(saved)


@pytest.mark.timeout(300)
def test_missing_and_corrupt_samples_are_skipped_and_counted(trained, tiny_phantom_manifest, tiny_text_dir):
    tmp, trainer, _ = trained
    data = json.loads((tmp / "samples" / "datalist.json").read_text())
    train = data["training"]
    gone, corrupt = Path(train[0]["image"]), Path(train[1]["image"])
    gone.unlink()
    corrupt.write_bytes(b"not numpy")
    wf = _workflow(tmp, tiny_phantom_manifest, tiny_text_dir, max_epochs=1, ckpt_dir=str(tmp / "models_skip"))
    wf.initialize()
    wf.run()  # no crash mid-epoch
    state = wf.parser.get_parsed_content("train#trainer").state
    assert state.metrics["skipped_samples"] == 2
    assert state.epoch == 1 and np.isfinite(state.metrics["epoch_loss"])
    wf.finalize()


def test_missing_text_encoder_dir_fails_at_start(tmp_path, tiny_phantom_manifest):
    wf = _workflow(tmp_path, tiny_phantom_manifest, tmp_path / "no_such_text_model")
    with pytest.raises(Exception) as info:
        wf.initialize()
        wf.parser.get_parsed_content("network_def")
    assert "no_such_text_model: text encoder directory not found" in str(_root_cause(info.value))


def test_teacher_checkpoint_of_another_architecture_fails_at_start(tmp_path, tiny_phantom_manifest, tiny_text_dir):
    wrong = tmp_path / "resnet.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), wrong)
    wf = _workflow(
        tmp_path, tiny_phantom_manifest, tiny_text_dir, teacher_random_init=False, teacher_checkpoint=str(wrong)
    )
    with pytest.raises(Exception) as info:
        wf.initialize()
        wf.parser.get_parsed_content("teacher")
    assert "resnet.pth" in str(_root_cause(info.value))
    missing = tmp_path / "medsam_vit_b.pth"
    wf = _workflow(
        tmp_path,
        tiny_phantom_manifest,
        tiny_text_dir,
        teacher_random_init=False,
        teacher_variant="medsam_vit_b",
        teacher_checkpoint=str(missing),
    )
    with pytest.raises(Exception) as info:
        wf.initialize()
        wf.parser.get_parsed_content("teacher")
    assert "medsam_vit_b.pth: medsam_vit_b checkpoint not found" in str(_root_cause(info.value))


@pytest.mark.timeout(300)
def test_mlflow_run_holds_parameters_losses_and_validation_metrics(tmp_path, tiny_phantom_manifest, tiny_text_dir):
    """`monai.bundle run --tracking mlflow` with its default store: the SQLite file `output_dir/mlruns.db`.

    (MONAI 1.6 refuses MLflow's retired `file:` directory store, so a local run's store is this file.)"""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str([str(CONFIGS / "train.json"), str(TINY_CLIP_OVERLAY)]),
        "--bundle_root",
        str(BUNDLES / "foundation_clip"),
        "--tracking",
        "mlflow",
        "--experiment_name",
        "sa1_test",
        "--manifest",
        str(tiny_phantom_manifest),
        "--text_model_dir",
        str(tiny_text_dir),
        "--samples_dir",
        str(tmp_path / "samples"),
        "--teacher_cache_dir",
        str(tmp_path / "cache"),
        "--output_dir",
        str(tmp_path / "out"),
        "--ckpt_dir",
        str(tmp_path / "models"),
        "--max_epochs",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = tmp_path / "out" / "mlruns.db"
    assert store.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    exp = client.get_experiment_by_name("sa1_test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    params = run.data.params
    assert params["contrastive"] == "infonce" and params["alpha"] == "1.0" and params["beta"] == "1.0"
    assert params["image_encoder"] == "tiny_cnn" and params["max_epochs"] == "2"
    for key in (
        "epoch_loss",
        "epoch_loss_contrastive",
        "epoch_loss_distill",
        "val_zero_shot_acc",
        "val_recall_at_5",
        "val_distill_cosine",
    ):
        history = client.get_metric_history(run.info.run_id, key)
        assert [h.step for h in history] == [1, 2], key  # one value per epoch
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 2  # per-iteration loss
    # the executed config is logged although --output_dir came as a plain path (MONAI 1.6 hands the handler
    # an unevaluated "<path> + '/config_<time>.json'"; TrackingParams mends it)
    logged = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert any(a.startswith("config_") and a.endswith(".json") for a in logged), logged


@pytest.mark.timeout(300)
def test_lung_map_dice_scores_sa2s_map_of_the_held_out_phantoms(tiny_phantom_manifest, tiny_text_dir, monkeypatch):
    """The map-level figure of benchmarks/clip_checkpoint_choice.py: the real map of a tiny model, then maps whose
    Dice is known (the true lung field, and the lung field shrunk by one voxel as a sharper classifier shrank it)."""
    from scipy import ndimage

    from common.data import validation_phantoms
    from common.engines import LungMapDice
    from common.metrics import dice_score
    from common.networks import build_lung_clip

    cases = validation_phantoms(tiny_phantom_manifest, 1)
    assert [c["id"] for c in cases] == ["tiny_phantom_2"]  # the last phantom, as build_clip_datalist validates on
    torch.manual_seed(0)
    model = build_lung_clip(
        image_encoder="tiny_cnn",
        pretrained=False,
        image_encoder_kwargs={"out_channels": 16, "width": 8},
        text_model_dir=tiny_text_dir,
        embed_dim=16,
        teacher_shape=None,
    ).train()
    metric = LungMapDice(
        model, cases, {"slice_size": 64, "image_size": 32, "patch_size": 32, "patch_mm": 60.0}, num_slices=3
    )
    volumes = metric.volumes()
    ((hu, lungs, _),) = volumes
    assert hu.shape[2] == lungs.shape[2] == 3 and all(
        lungs[:, :, k].any() for k in range(3)
    )  # three slices, each through the lungs
    dice = metric.compute()
    assert 0.0 <= dice <= 1.0 and metric.compute() == dice  # deterministic
    assert model.training  # the network goes back to training mode

    def map_of(field):  # similarity +1 for lung where ``field`` is, -1 elsewhere; every other class 0
        def volume(hu, affine, network, name="volume"):
            sim = torch.zeros((7,) + hu.shape)
            sim[0] = torch.from_numpy(np.where(field, 1.0, -1.0))
            return sim

        return volume

    monkeypatch.setattr(metric.inferer, "volume", map_of(lungs))
    assert metric.compute() == pytest.approx(1.0) and metric.last_area_ratio == pytest.approx(1.0)
    shrunk = np.stack([ndimage.binary_erosion(lungs[:, :, k]) for k in range(3)], axis=2)
    monkeypatch.setattr(metric.inferer, "volume", map_of(shrunk))
    expected = dice_score(shrunk, lungs)
    assert expected < 1.0 and metric.compute() == pytest.approx(expected) and metric.last_area_ratio < 1.0
    with pytest.raises(ValueError, match="held-out phantom"):
        LungMapDice(model, [], {})


@pytest.mark.real
@pytest.mark.timeout(600)
def test_real_default_models_on_real_ct(tmp_path, default_manifest):
    """EfficientNet-Lite0 (ImageNet), MiniLM and the LiteMedSAM teacher, as the demo config ships them, on
    real LIDC slices with phantoms for patches and validation: one short epoch trains, validates and saves."""
    from common.io import write_json_atomic

    cases = {c["id"]: c for c in default_manifest["cases"]}
    manifest = tmp_path / "manifest.json"
    write_json_atomic(manifest, {"cases": [cases["lidc_idri_1011"], cases["phantom_000"], cases["phantom_005"]]})
    wf = _workflow(
        tmp_path,
        manifest,
        None,
        overlays=(CONFIGS / "demo.json",),
        max_epochs=1,
        num_slices=4,
        phantom_slices=2,
        patches_per_class=1,
        num_workers=0,
        batch_size=4,
        val_phantoms=1,
    )
    wf.initialize()
    wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    assert trainer.state.metrics["epoch_loss_distill"] > 0
    assert 0.0 < evaluator.state.metrics["val_distill_cosine"] <= 1.0
    assert (tmp_path / "models" / "model.pt").is_file()
    wf.finalize()
