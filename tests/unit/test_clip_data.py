"""SA-1 data: image-text pairs from phantoms and real CT, sentences from labels, skipping datasets."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from common.classes import BACKGROUND_NAMES, CLASS_NAMES, PATCH_CLASSES
from common.data import SkippingDataset, build_clip_datalist, class_prompts, collate_skipping, patch_caption
from common.data.clip_pairs import deeplesion_sentences, radchestct_sentences
from tests.conftest import LUNG_PET_CT_DX_8MM

SETTINGS = dict(
    slice_size=64, num_slices=3, phantom_slices=3, patch_mm=60.0, patch_size=32, patches_per_class=2, val_phantoms=1
)


@pytest.fixture(scope="module")
def tiny_pairs(tiny_phantom_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    return out, build_clip_datalist(tiny_phantom_manifest, out, progress=False, **SETTINGS)


def test_prompts_and_captions_share_wording():
    prompts = class_prompts()
    assert prompts == [
        f"CT patch of the {c}" for c in CLASS_NAMES + BACKGROUND_NAMES
    ]  # anatomy in channel order, then background
    assert patch_caption("air outside the body", "air outside the body") == "CT patch of the air outside the body"
    assert patch_caption("aorta", "blood vessel") == "CT patch of the aorta, a blood vessel"
    assert patch_caption("trachea", "airway") == "CT patch of the trachea, an airway"
    assert patch_caption("right lung", "lung") == "CT patch of the right lung"  # the name already says the class


def test_sentences_from_labels_and_lesion_metadata():
    assert radchestct_sentences(["nodule*right_upper_lobe", "nodule*left_lower_lobe", "cardiomegaly"]) == [
        "Nodule in the left lower lobe and right upper lobe.",
        "Cardiomegaly.",
    ]
    assert radchestct_sentences([]) == ["No abnormality labelled."]
    rows = [
        {"Coarse_lesion_type": "5", "Lesion_diameters_Pixel_": "20.5, 10.0", "Spacing_mm_px_": "0.8, 0.8, 5"},
        {"Coarse_lesion_type": "-1"},
    ]
    assert deeplesion_sentences(rows) == ["Lung lesion, 16 mm by 8 mm.", "Unclassified lesion."]


def test_datalist_splits_kinds_and_files(tiny_pairs, tiny_phantom_manifest):
    out, data = tiny_pairs
    manifest = json.loads(tiny_phantom_manifest.read_text())
    phantoms = [c["id"] for c in manifest["cases"] if c["kind"] == "phantom"]
    assert {e["case_id"] for e in data["validation"]} == {phantoms[-1]}  # the last phantom is held out
    assert {e["case_id"] for e in data["training"]} == {"totalseg_chest_crop_b", *phantoms[:-1]}
    assert data["skipped"] == []
    real = [e for e in data["training"] if e["case_id"] == "totalseg_chest_crop_b"]
    real_slices = [e for e in real if e["kind"] == "slice"]
    assert len(real_slices) == 3 and all(e["text"] == "" and e["label"] == -1 for e in real_slices)  # distillation only
    # the crop has no air around the patient: its only patches are of lung, where the HU threshold finds it
    real_patches = [e for e in real if e["kind"] == "patch"]
    assert real_patches and all(e["label"] == 0 and e["text"] == "CT patch of the lung" for e in real_patches)
    phantom_slices = [e for e in data["training"] if e["kind"] == "slice" and e["case_id"] != "totalseg_chest_crop_b"]
    assert phantom_slices and all("ct chest" in e["text"] for e in phantom_slices)  # the cleaned report
    for e in data["training"] + data["validation"]:
        img = np.load(e["image"])
        assert img.dtype == np.float16 and 0.0 <= img.min() and img.max() <= 1.0
        assert img.shape == ((32, 32) if e["kind"] == "patch" else (64, 64))
    assert json.loads((out / "datalist.json").read_text())["validation"] == data["validation"]


def test_real_scan_patches_are_what_needs_no_label(tmp_path):
    """A full-field real scan gives captioned patches of the classes known without a hand-drawn label: the air
    outside the body (``body_mask``) and the lung (the classical HU threshold)."""
    from common.io import write_json_atomic

    manifest = tmp_path / "manifest.json"
    write_json_atomic(
        manifest,
        {"cases": [{"id": "a0002", "path": str(LUNG_PET_CT_DX_8MM), "kind": "real", "format": "dicom"}], "notes": []},
    )
    data = build_clip_datalist(manifest, tmp_path / "pairs", progress=False, **{**SETTINGS, "val_phantoms": 0})
    patches = [e for e in data["training"] if e["kind"] == "patch"]
    air, lung = PATCH_CLASSES.index("air outside the body"), PATCH_CLASSES.index("lung")
    assert len(patches) == 2 * 3 * SETTINGS["patches_per_class"]  # every slice has room for both
    assert {e["label"] for e in patches} == {air, lung}
    for e in patches:  # window [-1000, 400] HU -> [0, 1]; the body may show at the edge of an air patch
        assert e["text"] == ("CT patch of the air outside the body" if e["label"] == air else "CT patch of the lung")
        img = np.load(e["image"]).astype(np.float32)
        c = img.shape[0] // 2
        assert float(img[c - 1 : c + 1, c - 1 : c + 1].mean()) < (0.15 if e["label"] == air else 0.45)  # -790 / -370 HU


def test_real_patch_classes_can_be_left_out_for_the_ablation(tmp_path):
    """``real_patch_classes`` picks what a real scan's patches may be: "lung" alone, or none (its slices then feed the
    distillation loss only); a class a real scan cannot give without a label is an error."""
    from common.io import write_json_atomic

    manifest = tmp_path / "manifest.json"
    write_json_atomic(
        manifest,
        {"cases": [{"id": "a0002", "path": str(LUNG_PET_CT_DX_8MM), "kind": "real", "format": "dicom"}], "notes": []},
    )
    settings = {**SETTINGS, "val_phantoms": 0}
    lung_only = build_clip_datalist(
        manifest, tmp_path / "lung", progress=False, real_patch_classes=["lung"], **settings
    )
    assert {e["label"] for e in lung_only["training"] if e["kind"] == "patch"} == {PATCH_CLASSES.index("lung")}
    none = build_clip_datalist(manifest, tmp_path / "none", progress=False, real_patch_classes=[], **settings)
    assert [e["kind"] for e in none["training"]] == ["slice"] * 3
    with pytest.raises(ValueError, match="heart"):
        build_clip_datalist(manifest, tmp_path / "bad", progress=False, real_patch_classes=["heart"], **settings)


def test_patches_show_their_class(tiny_pairs):
    """The centre of a patch has the intensity of its class (window [-1000, 400] HU -> [0, 1])."""
    _, data = tiny_pairs
    patches = [e for e in data["training"] + data["validation"] if e["kind"] == "patch"]
    seen = {e["label"] for e in patches}
    assert {
        0,
        2,
        4,
        5,
        6,
    } <= seen  # lung, blood vessel, bone, outside air and soft tissue are big enough in every phantom
    # lung, heart, vessel, airway (lumen), bone, air outside the body (the skin may share its centre at 5 mm pixels),
    # soft tissue (fat to muscle)
    expected = {
        0: (0.0, 0.5),
        1: (0.6, 0.9),
        2: (0.6, 1.0),
        3: (0.0, 0.45),
        4: (0.7, 1.0),
        5: (0.0, 0.45),
        6: (0.45, 0.9),
    }
    for e in patches:
        img = np.load(e["image"]).astype(np.float32)
        c = img.shape[0] // 2
        centre = float(img[c - 1 : c + 1, c - 1 : c + 1].mean())
        lo, hi = expected[e["label"]]
        assert lo <= centre <= hi, f"{e['text']}: centre {centre:.2f} outside {lo, hi}"
        assert PATCH_CLASSES[e["label"]] in e["text"]


def test_datalist_reuses_cases_and_skips_unreadable(tiny_pairs, tiny_phantom_manifest, tmp_path):
    out, data = tiny_pairs
    first = data["training"][0]["image"]
    before = os.stat(first).st_mtime_ns
    again = build_clip_datalist(tiny_phantom_manifest, out, progress=False, **SETTINGS)
    assert again["training"] == data["training"] and os.stat(first).st_mtime_ns == before  # nothing rewritten

    manifest = json.loads(tiny_phantom_manifest.read_text())
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    manifest["cases"].insert(0, {"id": "broken", "path": str(broken), "kind": "real", "format": "nifti"})
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    result = build_clip_datalist(tmp_path / "manifest.json", out, progress=False, **SETTINGS)
    assert [s["case_id"] for s in result["skipped"]] == ["broken"]
    assert "broken.nii.gz" in result["skipped"][0]["reason"] or "broken.nii.gz" in result["skipped"][0]["path"]
    assert len(result["training"]) == len(data["training"])  # every other case is still there


def test_datalist_needs_a_training_phantom(tiny_phantom_manifest, tmp_path):
    with pytest.raises(ValueError, match="need more than val_phantoms"):
        build_clip_datalist(tiny_phantom_manifest, tmp_path, progress=False, **{**SETTINGS, "val_phantoms": 3})
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        build_clip_datalist(tmp_path / "nowhere.json", tmp_path)


def test_skipping_dataset_reports_missing_and_unreadable(tmp_path):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    good = tmp_path / "good.npy"
    np.save(good, np.zeros((8, 8), np.float16))
    corrupt = tmp_path / "corrupt.npy"
    corrupt.write_bytes(b"garbage")
    items = [
        {"image": str(good), "text": "a"},
        {"image": str(corrupt), "text": "b"},
        {"image": str(tmp_path / "gone.npy"), "text": "c"},
    ]
    ds = SkippingDataset(
        items,
        Compose(
            [
                LoadImaged("image", reader="NumpyReader", image_only=True),
                EnsureChannelFirstd("image", channel_dim="no_channel"),
            ]
        ),
    )
    assert len(ds) == 2 and ds.missing == [{"image": str(tmp_path / "gone.npy"), "reason": "file not found"}]
    batch = collate_skipping([ds[0], ds[1]])
    assert batch["image"].shape == (1, 1, 8, 8) and batch["text"] == ["a"]
    assert len(batch["skipped"]) == 1 and batch["skipped"][0][0] == str(corrupt)
    assert collate_skipping([ds[1]]) == {"skipped": batch["skipped"]}  # a batch with nothing left
    with pytest.raises(ValueError, match="no usable samples"):
        SkippingDataset([{"image": str(tmp_path / "gone.npy")}])
    assert torch.is_tensor(batch["image"])
