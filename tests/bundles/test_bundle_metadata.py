"""Every bundle's ``metadata.json`` against the MONAI Bundle specification (MONAI docs, "Model Bundle"): the keys
and types it requires, a schema URL that matches the package-version key used, and ``network_data_format``
describing the network's own input and output, checked by ``monai.bundle verify_net_in_out`` where the network
gives one tensor."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
# the schema files model-zoo bundles name, and the package-version key each one requires
SCHEMA_KEY = {
    "meta_schema_20220324.json": "optional_packages_version",
    "meta_schema_20240725.json": "required_packages_version",
}
TENSOR_KEYS = {
    "type": str,
    "format": str,
    "modality": str,
    "num_channels": int,
    "spatial_shape": list,
    "dtype": str,
    "value_range": list,
    "is_patch_data": bool,
    "channel_def": dict,
}


def _metadata(bundle: str) -> dict:
    return json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_has_the_keys_and_types_the_specification_requires(bundle):
    m = _metadata(bundle)
    assert BUNDLES == ["foundation_clip", "hsam_finetune", "probmap", "pseudolabel"]
    for key in (
        "version",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "task",
        "description",
        "authors",
        "copyright",
    ):
        assert isinstance(m.get(key), str) and m[key], f"{bundle}: {key}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", m["version"]) and m["version"] in m["changelog"]
    for key in ("required_packages_version", "optional_packages_version"):
        assert isinstance(m[key], dict) and all(isinstance(v, str) for v in m[key].values()), f"{bundle}: {key}"
    schema = m["schema"].rsplit("/", 1)[-1]
    assert schema in SCHEMA_KEY and SCHEMA_KEY[schema] in m, f"{bundle}: {schema} requires {SCHEMA_KEY.get(schema)}"
    fmt = m["network_data_format"]
    assert set(fmt) == {"inputs", "outputs"} and fmt["inputs"] and fmt["outputs"]
    for side in ("inputs", "outputs"):
        for name, spec in fmt[side].items():
            for key, kind in TENSOR_KEYS.items():
                assert isinstance(spec.get(key), kind), f"{bundle}: {side}.{name}.{key} should be {kind.__name__}"
            assert spec["num_channels"] >= 1 and len(spec["value_range"]) in (0, 2)
            assert all(k.isdigit() for k in spec["channel_def"]), (
                f"{bundle}: {side}.{name}.channel_def keys are channel indices"
            )


def test_served_copies_describe_the_volume_in_and_the_label_map_out(tmp_path):
    """metadata.json describes the network (slices, windows); MONAI Label reads the served task's volume and labels."""
    from common.apps.serve import ServedBundle, _served_config

    for bundle in ("probmap", "hsam_finetune"):
        _, served = _served_config(ServedBundle(REPO / "bundles" / bundle, tmp_path / "model.pt"))
        image = served["network_data_format"]["inputs"]["image"]
        assert image["spatial_shape"] == ["*", "*", "*"] and image["format"] == "hounsfield"
        assert served["network_data_format"]["outputs"]["pred"]["format"] == "segmentation"
    assert served["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background",
        "1": "right lung",
        "2": "left lung",
    }
    assert _metadata("hsam_finetune")["network_data_format"]["inputs"]["image"]["spatial_shape"] == ["*", "*"]


@pytest.mark.real
def test_verify_net_in_out_passes_on_the_shipped_hsam_and_fails_on_a_wrong_description():
    """The shipped H-SAM (LiteMedSAM backbone) on a 256 x 256 slice: one channel of float32 out, as metadata.json says."""
    bundle = REPO / "bundles" / "hsam_finetune"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "verify_net_in_out",
        "--net_id",
        "probability_network",
        "--meta_file",
        str(bundle / "configs" / "metadata.json"),
        "--config_file",
        str(bundle / "configs" / "inference.json"),
        "--bundle_root",
        str(bundle),
        "--device",
        "cpu",
        "--any",
        "256",
    ]
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "verified with no error" in ok.stdout + ok.stderr, ok.stderr[-3000:]
    wrong = subprocess.run(
        cmd + ["--_meta_#network_data_format#outputs#pred#num_channels", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert wrong.returncode != 0 and "output channel number `1` doesn't match: `2`" in wrong.stderr


def test_every_config_reference_resolves_and_has_one_spelling():
    """Each ``common.…`` name a bundle config uses resolves, and is spelled from the package that exports it
    (``common.data.SkippingDataset``, never ``common.data.dataset.SkippingDataset`` too)."""
    import importlib
    import re

    refs = set()
    for config in sorted(REPO.glob("bundles/*/configs/*.json")) + sorted(REPO.glob("tests/configs/*.json")):
        refs |= set(re.findall(r"\bcommon(?:\.[A-Za-z_]\w*)+", config.read_text()))
    assert len(refs) > 50
    two_spellings = []
    for ref in sorted(refs):
        parts = ref.split(".")
        for k in range(len(parts), 0, -1):  # the longest importable module
            try:
                module = importlib.import_module(".".join(parts[:k]))
                break
            except ImportError:
                continue
        obj = module
        for attribute in parts[k:]:
            obj = getattr(obj, attribute)  # an AttributeError names a reference that does not resolve
        if k < len(parts):
            target = getattr(module, parts[k])
            for j in range(1, k):
                if getattr(importlib.import_module(".".join(parts[:j])), parts[k], None) is target:
                    two_spellings.append(f"{ref} -> {'.'.join(parts[:j] + parts[k:])}")
                    break
    assert not two_spellings, two_spellings
