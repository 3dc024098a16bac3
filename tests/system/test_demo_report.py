"""The ``make demo`` report, looked at in a real headless Chromium.

The demo itself takes about 40 minutes on 2 CPU cores (``make demo``; measured by hand, quoted in the
README), so this test builds the report from stage outputs written in the stages' own formats on two tiny
held-out phantoms and the real TotalSegmentator crop b: SA-2 maps and masks, SA-3a pseudo labels and SA-3b
masks derived from each phantom's truth (shifted, thinned, thickened, so every method scores differently),
scored with the project's own metrics, and training histories as MetricsHistory writes them. The page must
show all four stages with their figures, numbers that match the outputs, no broken image, no sideways scroll.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from common.default_data import shared_data_dir

TINY_SHAPE, TINY_SPACING = (64, 64, 24), (5.0, 5.0, 10.0)
REAL_B = shared_data_dir() / "totalseg_chest_crops" / "chest_crop_b.nii.gz"
REAL_ID = "totalseg_chest_crop_b"  # its manifest id: the demo links it under that name


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _case_outputs(
    out: Path,
    which: str,
    case_id: str,
    hu: np.ndarray,
    lungs: np.ndarray,
    affine: np.ndarray,
    pseudo_label: bool = True,
    hsam_dir: str | None = None,
) -> dict:
    """Write one case's SA-2 / SA-3a / SA-3b outputs as the bundles name them (SA-3a unless ``pseudo_label`` is
    false; SA-3b into ``hsam_dir``, by default ``which``); returns the three masks."""
    from common.report import save_probmap_overlay_png, save_pseudolabel_overlay_png

    sa2 = np.roll(lungs, 2, axis=0)  # a shifted zero-shot mask
    pseudo = ndimage.binary_erosion(lungs, iterations=1)  # a thinner pseudo label
    hsam = ndimage.binary_dilation(pseudo, iterations=1) & ndimage.binary_dilation(lungs)  # close to the truth
    prob = np.zeros((5, *lungs.shape), np.float32)
    prob[0] = ndimage.gaussian_filter(sa2.astype(np.float32), 1.5)
    prob[1:] = (1 - prob[0]) / 4
    d = out / "probmap" / which / case_id
    _save(np.moveaxis(prob, 0, -1), affine, d / f"{case_id}_probmap.nii.gz")  # as SaveProbmapd writes it
    _save(sa2.astype(np.uint8), affine, d / f"{case_id}_lung_mask.nii.gz")
    save_probmap_overlay_png(
        d / f"{case_id}_overlay.png",
        hu,
        prob,
        sa2,
        affine,
        ["lung", "heart", "blood vessel", "airway", "bone"],
        case_id,
    )
    (d / f"{case_id}_probmap.json").write_text(json.dumps({"case_id": case_id, "lung_ml": {"total": float(sa2.sum())}}))
    d = out / "pseudolabel" / which / case_id
    sides = pseudo.astype(np.uint8) * np.where(
        np.arange(lungs.shape[0])[:, None, None] < lungs.shape[0] // 2, 1, 2
    ).astype(np.uint8)
    if pseudo_label:
        _save(sides, affine, d / f"{case_id}_pseudo_label.nii.gz")
        save_pseudolabel_overlay_png(d / f"{case_id}_pseudo_overlay.png", hu, sa2, sides, affine, case_id)
        (d / f"{case_id}_pseudolabel.json").write_text(
            json.dumps(
                {
                    "case_id": case_id,
                    "lung_ml": {"total": float(pseudo.sum())},
                    "confidence": {"passed": True, "agreement_dice": 0.9, "mean_predicted_iou": 0.85, "reasons": []},
                }
            )
        )
    _save(
        hsam.astype(np.uint8),
        affine,
        out / "hsam_finetune" / (hsam_dir or which) / case_id / f"{case_id}_lung_mask.nii.gz",
    )
    if (hsam_dir or which).startswith("heldout_real"):  # the case report SaveSegmentationd writes, by the same function
        from common.metrics import lung_report

        (out / "hsam_finetune" / (hsam_dir or which) / case_id / f"{case_id}_report.json").write_text(
            json.dumps({"case_id": case_id, **lung_report(hsam, hu, affine)})
        )
    return {"sa2": sa2, "pseudo": pseudo, "hsam": hsam}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_phantom_manifest, tiny_text_dir):
    """A finished demo's outputs, tiny; returns (out, ingest, steps, expected figures, the demo size)."""
    import dataclasses

    import nibabel as nib

    from common.apps.demo import SIZES, demo_steps
    from common.apps.demo_ingest import run_ingest
    from common.data import phantom_datalist
    from common.engines import write_scores
    from common.io import write_json_atomic
    from common.lungmask import hu_threshold_lung_mask
    from common.metrics import dice_score, segmentation_scores
    from common.networks import build_lung_clip, save_network

    out = tmp_path_factory.mktemp("demo")
    held = phantom_datalist(out / "phantoms_heldout", n=2, seed=100, shape=TINY_SHAPE, spacing=TINY_SPACING)
    rows = {"probmap": [], "pseudolabel": [], "hsam": []}
    for c in held:
        img = nib.load(c["image"])
        hu, affine = np.asarray(img.dataobj, np.float32), img.affine
        lungs = np.asarray(nib.load(c["lungs"]).dataobj) > 0
        masks = _case_outputs(out, "heldout_phantoms", c["case_id"], hu, lungs, affine)
        rows["probmap"].append({"case_id": c["case_id"], "lung_mask_dice": dice_score(masks["sa2"], lungs)})
        rows["pseudolabel"].append(
            {
                "case_id": c["case_id"],
                "pseudo_dice": dice_score(masks["pseudo"], lungs),
                "sa2_mask_dice": dice_score(masks["sa2"], lungs),
            }
        )
        rows["hsam"].append({"case_id": c["case_id"], **segmentation_scores(masks["hsam"], lungs, tuple(TINY_SPACING))})
    write_scores(rows["probmap"], out / "probmap" / "heldout_phantoms")
    write_scores(rows["pseudolabel"], out / "pseudolabel" / "heldout_phantoms")
    write_scores(rows["hsam"], out / "hsam_finetune" / "heldout_phantoms")
    # the training phantoms (SA-2, SA-3a; their pseudo labels train H-SAM) and the real CT (SA-2 and H-SAM, as the demo runs it)
    img = nib.load(held[0]["image"])
    for case_id in ("train_phantom_000_ct", "train_phantom_001_ct"):
        _case_outputs(
            out,
            "training_scans",
            case_id,
            np.asarray(img.dataobj, np.float32),
            np.asarray(nib.load(held[0]["lungs"]).dataobj) > 0,
            img.affine,
        )
    write_json_atomic(
        out / "pseudolabel" / "training_scans" / "datalist.json",
        {
            "training": [{"case_id": "train_phantom_000_ct"}],
            "validation": [{"case_id": "train_phantom_001_ct"}],
            "excluded": [],
        },
    )
    # the held-out real scan: SA-2 and H-SAM of the demo's chain and of the shipped one (a thinner mask), as make segment writes them
    img = nib.load(str(REAL_B))
    real_hu = np.asarray(img.dataobj, np.float32)
    real_lungs = hu_threshold_lung_mask(real_hu, tuple(np.linalg.norm(img.affine[:3, :3], axis=0)))
    rows["real"] = {"HU": real_lungs}
    for who, lungs in (("demo", real_lungs), ("shipped", ndimage.binary_erosion(real_lungs, iterations=2))):
        rows["real"][who] = _case_outputs(
            out, f"heldout_real_{who}", REAL_ID, real_hu, lungs, img.affine, pseudo_label=False
        )["hsam"]
    (out / "heldout_scans").mkdir()
    (out / "heldout_scans" / f"{REAL_ID}.nii.gz").symlink_to(REAL_B)
    # SA-1: a tiny real LungCLIP and held-out patches with their classes, for the zero-shot confusion matrix
    torch.manual_seed(0)
    model = build_lung_clip(
        image_encoder="tiny_cnn",
        pretrained=False,
        image_encoder_kwargs={"out_channels": 16, "width": 8},
        text_model_dir=tiny_text_dir,
        embed_dim=32,
        teacher_shape=None,
    )
    model.preprocessing = {"image_size": 32}
    save_network(model, out / "foundation_clip" / "models" / "model.pt")
    patches = out / "data" / "clip_pairs_demo"  # where SA-1's demo.json writes them under the data folder
    patches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(15):
        np.save(patches / f"p{i}.npy", rng.random((32, 32), dtype=np.float32))
    write_json_atomic(
        patches / "datalist.json",
        {"validation": [{"image": str(patches / f"p{i}.npy"), "label": i % 5} for i in range(15)]},
    )
    write_json_atomic(
        out / "foundation_clip" / "metrics_history.json",
        {
            "history": [
                {
                    "epoch": e,
                    "epoch_loss": 2.0 / e,
                    "epoch_loss_contrastive": 1.8 / e,
                    "epoch_loss_distill": 0.2 / e,
                    # the checkpoint (best_epoch, the key metric's) is epoch 2's: the report reads it, not the last epoch
                    "val_zero_shot_acc": (0.6, 0.8, 0.7)[e - 1],
                    "best_epoch": min(e, 2),
                    "val_recall_at_5": 0.9,
                    "val_distill_cosine": 0.7,
                }
                for e in (1, 2, 3)
            ]
        },
    )
    write_json_atomic(
        out / "hsam_finetune" / "train" / "metrics_history.json",
        {
            "history": [
                {
                    "epoch": e,
                    "epoch_loss": 1.0 / e,
                    "epoch_loss_stage1": 1.1 / e,
                    "epoch_loss_stage2": 0.9 / e,
                    "val_mean_dice": 0.6 + 0.1 * e,
                    "best_epoch": e,
                }
                for e in (1, 2, 3)
            ]
        },
    )
    fig_dir = out / "report" / "figures"
    fig_dir.mkdir(parents=True)
    tiny = json.loads(tiny_phantom_manifest.read_text())
    write_json_atomic(
        out / "data" / "manifest.json", {**tiny, "cases": [c for c in tiny["cases"] if c["kind"] == "phantom"][:1]}
    )  # one case is enough here
    ingest = run_ingest(out, out / "data", fig_dir)
    ingest["seconds"] = 12.0
    size = dataclasses.replace(
        SIZES["demo"],
        phantom_shape=TINY_SHAPE,
        phantom_spacing=TINY_SPACING,
        heldout_phantoms=2,
        training_phantoms=2,
        real_training=(),
        real_heldout=(REAL_ID,),
    )
    steps = demo_steps(out, size)
    for i, step in enumerate(steps):
        step.status, step.seconds, step.cmd = "ran", 60.0 + i, " ".join(step.command("sqlite:///mlruns.db"))
    return out, ingest, steps, rows, size


def test_hsam_section_draws_the_epoch_losses_the_trainer_records(tmp_path, monkeypatch):
    """The loss keys hsam_finetune's train.json records (EpochAverage, as MetricsHistory writes them) are drawn in the loss panel."""
    import common.report
    from common.apps.demo_sections import hsam_section
    from common.io import write_json_atomic

    history = [
        {
            "epoch": e,
            "epoch_loss": 1.0 / e,
            "epoch_loss_stage1": 1.1 / e,
            "epoch_loss_stage2": 0.9 / e,
            "val_mean_dice": 0.5 + 0.1 * e,
            "best_epoch": e,
        }
        for e in (1, 2)
    ]
    write_json_atomic(tmp_path / "hsam_finetune" / "train" / "metrics_history.json", {"history": history})
    summary = {k: {"mean": 0.5, "sd": 0.1} for k in ("dice", "hd95_mm")}
    write_json_atomic(
        tmp_path / "hsam_finetune" / "heldout_phantoms" / "scores.json",
        {"cases": [{"case_id": "p0", "dice": 0.5}], "summary": summary},
    )
    figures = []
    save = common.report._save_figure
    monkeypatch.setattr(
        common.report,
        "_save_figure",
        lambda fig, path: (
            figures.append({ax.get_title(): [line.get_label() for line in ax.get_lines()] for ax in fig.axes}),
            save(fig, path),
        )[1],
    )
    (tmp_path / "figures").mkdir()
    metrics, body = hsam_section(tmp_path, tmp_path / "figures")
    assert metrics["ran"] and (tmp_path / "figures" / "hsam_curves.png").is_file() and "hsam_curves.png" in body
    assert figures[0]["training losses (epoch means)"] == ["epoch_loss", "epoch_loss_stage1", "epoch_loss_stage2"]
    assert "val_mean_dice" in figures[0]["validation"]
    assert "between the training slices" not in body
    assert (
        "between the training slices of every training scan"
        in hsam_section(tmp_path, tmp_path / "figures", between=True)[1]
    )


def test_report_reads_well_in_a_real_browser(demo_run, render_page):
    from common.apps.demo_report import build_report
    from common.metrics import dice_score

    out, ingest, steps, rows, size = demo_run
    metrics = build_report(out, ingest, steps, size, data_dir=out / "data", total_seconds=1234.0)
    saved = json.loads((out / "report" / "metrics.json").read_text())
    assert {"clip", "probmap", "pseudolabel", "hsam"} <= set(saved)
    assert all(saved[s]["ran"] for s in ("clip", "probmap", "pseudolabel", "hsam")), {
        s: saved[s].get("error") for s in ("clip", "probmap", "pseudolabel", "hsam")
    }
    hsam_dice = float(np.mean([r["dice"] for r in rows["hsam"]]))
    assert saved["hsam"]["heldout_phantoms"]["dice"]["mean"] == pytest.approx(hsam_dice)
    assert saved["probmap"]["heldout_phantoms"]["lung_mask_dice"]["mean"] == pytest.approx(
        np.mean([r["lung_mask_dice"] for r in rows["probmap"]])
    )
    assert saved["clip"]["best_epoch"] == 2 and saved["clip"]["val_zero_shot_acc"] == pytest.approx(0.8)
    assert np.asarray(saved["clip"]["zero_shot_confusion"]).sum() == 15 and np.asarray(
        saved["clip"]["zero_shot_confusion"]
    ).sum(1).tolist() == [3] * 5 + [0, 0]  # 5 anatomical + 2 background rows
    # the comparison table is the bundle docs' script: HU threshold and the three stages, H-SAM's Dice as scored above
    table = saved["hsam"]["comparison"]["summary"]
    assert len(table) == 4 and table["H-SAM on pseudo labels (SA-3b)"]["dice"]["mean"] == pytest.approx(
        hsam_dice, abs=1e-6
    )
    assert saved["timings"]["total_s"] == 1234.0 and saved["timings"]["hsam_s"] > 0
    assert "held-out phantom lung Dice" in metrics["summary_text"]
    assert saved["pseudolabel"]["hsam_datalist"] == {
        "training": ["train_phantom_000_ct"],
        "validation": ["train_phantom_001_ct"],
        "excluded": [],
    }
    assert saved["probmap"]["heldout_real_demo_lung_volume_ml"][REAL_ID]["total"] > 0
    # the held-out real scan: the demo's H-SAM and the shipped one, each against the HU threshold, by the bundle docs' script
    shipped = {r["method"]: r for r in saved["shipped"]["rows"]}
    assert {"H-SAM demo", "H-SAM shipped", "SA-2 demo", "SA-2 shipped", "HU threshold"} <= set(shipped), sorted(shipped)
    expected = {who: round(dice_score(rows["real"][who], rows["real"]["HU"]), 3) for who in ("demo", "shipped")}
    assert {who: shipped[f"H-SAM {who}"]["dice_hu_threshold"] for who in expected} == expected and expected[
        "demo"
    ] > expected["shipped"]
    assert f"H-SAM demo Dice vs HU threshold {expected['demo']:.3f}" in metrics["summary_text"]
    assert (out / "report" / "figures" / f"heldout_real_{REAL_ID}.png").is_file()
    from PIL import Image

    pipeline = Image.open(
        out / "report" / "figures" / "pipeline.png"
    )  # two rows: the held-out phantom and the real CT (no pseudo label)
    assert pipeline.size[1] > 1.7 * 3.4 * 100 * 0.9 and pipeline.size[0] > 1000, pipeline.size

    facts = render_page(out / "report" / "index.html", out / "report" / "screenshot.png", width=1280)
    for heading in (
        "What ran",
        "The demo's models and the shipped ones on a real scan no stage trained on",
        "Evaluation on held-out phantoms",
        "CT, probability map, pseudo label and H-SAM mask",
        "SA-1 foundation_clip: training and zero-shot classification",
        "SA-2 probmap: zero-shot probability maps",
        "SA-3a pseudolabel: SAM pseudo labels",
        "SA-3b hsam_finetune: H-SAM on the pseudo labels",
        "MLflow runs",
        "Data and quality control",
    ):
        assert heading in facts["headings"], facts["headings"]
    assert facts["broken_images"] == [] and facts["n_images"] >= 10, facts
    assert not facts["overflow_x"], (facts["scroll_width"], facts["viewport_width"])
    assert (
        f"{hsam_dice:.3f}" in facts["text"] and "20:34" in facts["text"]
    )  # H-SAM's Dice and the total time, as read on the page
    assert "did not finish" not in facts["text"] and not facts["page_errors"]
    assert (
        "H-SAM shipped" in facts["text"] and str(shipped["H-SAM shipped"]["lung_ml"]) in facts["text"]
    )  # the held-out real scan's table
    from PIL import Image

    shot = np.asarray(Image.open(facts["png"]).convert("L"), dtype=float)
    assert shot.shape[1] == 1280 and shot.shape[0] == facts["page_height"] and shot.std() > 10


def test_report_of_a_stopped_demo_shows_what_finished(demo_run, tmp_path, render_page):
    """SA-3b's outputs missing (the demo stopped there): the earlier stages are reported, SA-3b says it did not finish."""
    import shutil

    from common.apps.demo_report import build_report

    out, ingest, steps, _, size = demo_run
    partial = tmp_path / "demo"
    shutil.copytree(out, partial, ignore=shutil.ignore_patterns("hsam_finetune", "report"))
    shutil.copytree(
        out / "report" / "figures", partial / "report" / "figures"
    )  # the ingest figures, drawn before the stages
    metrics = build_report(
        partial,
        ingest,
        steps,
        size,
        data_dir=partial / "data",
        failure="step hsam_finetune_train failed (exit 1)",
        total_seconds=600.0,
    )
    assert metrics["probmap"]["ran"] and metrics["pseudolabel"]["ran"] and not metrics["hsam"]["ran"]
    facts = render_page(partial / "report" / "index.html", tmp_path / "shot.png")
    assert "The demo stopped: step hsam_finetune_train failed (exit 1)" in facts["text"]
    assert "SA-3b did not finish" in facts["text"] and facts["broken_images"] == []


def test_ingest_gives_the_same_rows_case_by_case_and_two_at_a_time(tiny_phantom_manifest, tmp_path):
    """run_ingest's worker processes: the same QC verdicts, volumes, Dice and figures, in the manifest's order, as
    one case after the other (only the timings differ)."""
    from common.apps.demo_ingest import run_ingest

    results = {}
    for workers in (1, 2):
        out = tmp_path / f"workers_{workers}"
        (out / "figures").mkdir(parents=True)
        results[workers] = run_ingest(out, tiny_phantom_manifest.parent, out / "figures", workers=workers)
        results[workers]["written"] = sorted(p.name for p in (out / "preprocessed").iterdir())
        assert len(results[workers]["written"]) == len(results[workers]["cases"])  # one preprocessed volume a case
    untimed = [[{k: v for k, v in row.items() if not k.endswith(" s")} for row in results[w]["cases"]] for w in (1, 2)]
    assert untimed[0] == untimed[1]
    assert [row["case"] for row in untimed[1]] == [
        c["id"] for c in json.loads(tiny_phantom_manifest.read_text())["cases"]
    ]
    assert all(row["qc"] == "pass" and "lung mL (R/L)" in row for row in untimed[1])
    assert [f[0] for f in results[1]["figures"]] == [f[0] for f in results[2]["figures"]]
    assert results[1]["qc_rows"] == results[2]["qc_rows"] and results[1]["n_passed"] == results[2]["n_passed"] == 4
    assert results[1]["written"] == results[2]["written"]
