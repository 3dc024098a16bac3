"""`make data`'s manifest: every real scan of ../shared/data is in it, and the SA-1 exclusions name real cases."""

from __future__ import annotations

import json
from pathlib import Path

from common.default_data import shared_cases
from common.data import scan_datalist
from tests.conftest import SHARED

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


def test_manifest_lists_every_real_scan_of_the_shared_data():
    """SA-1 learns from the manifest, SA-2/SA-3a from the folder: a series missing from one is a scan SA-1 never sees."""
    in_folder = {Path(c["image"]).resolve() for c in scan_datalist(SHARED)}
    in_manifest = {Path(c["path"]).resolve() for c in shared_cases()}
    assert in_folder == in_manifest, (
        f"only in the folder: {sorted(map(str, in_folder - in_manifest))}; only in the manifest: {sorted(map(str, in_manifest - in_folder))}"
    )


def test_sa1_exclusions_name_manifest_cases():
    """An exclusion with a misspelt id would silently train on a scan it means to hold out."""
    ids = {c["id"] for c in shared_cases()} | {"pydicom_ct_small"}
    excluded = {
        name: set(json.loads((BUNDLES / "foundation_clip" / "configs" / name).read_text())["exclude_cases"])
        for name in ("train.json", "demo.json")
    }
    for name, cases in excluded.items():
        assert cases <= ids, f"{name}: exclude_cases {sorted(cases - ids)} are no case of the manifest"
    # the shipped SA-1 (release 0.4) was trained without the Lung-PET-CT-Dx series: make release must keep reproducing it
    assert {"lung_pet_ct_dx_a0001", "lung_pet_ct_dx_a0002"} <= excluded["demo.json"]
