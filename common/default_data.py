"""The embedded default data: real shared scans, pyradiomics' two chest CTs, pydicom's CT slice, phantoms.

    python -m common.default_data [--out data/default] [--phantoms 10]

writes ``manifest.json`` listing every case with its path and kind. Re-running skips what exists.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from common.io import write_json_atomic
from common.io.atomic import atomic_path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data" / "default"
PYRADIOMICS = "pyradiomics==3.0.1"
PYRADIOMICS_FILES = ("lung1_image.nrrd", "lung1_label.nrrd", "lung2_image.nrrd", "lung2_label.nrrd")
# Phantoms for the demo: small enough for CPU, real chest proportions (2.5 mm slices like LIDC).
PHANTOM_SHAPE = (160, 160, 96)
PHANTOM_SPACING = (2.0, 2.0, 2.5)


def shared_data_dir() -> Path:
    """``$LUNGSEG_SHARED_DATA`` or ``../shared/data`` beside the repository."""
    env = os.environ.get("LUNGSEG_SHARED_DATA")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return path


def shared_cases() -> list[dict]:
    root = shared_data_dir()
    cases = [
        {"id": "lidc_idri_1011", "path": root / "lidc_idri_1011_dicom", "kind": "real", "format": "dicom"},
        {
            "id": "totalseg_chest_crop_a",
            "path": root / "totalseg_chest_crops" / "chest_crop_a.nii.gz",
            "kind": "real",
            "format": "nifti",
        },
        {
            "id": "totalseg_chest_crop_b",
            "path": root / "totalseg_chest_crops" / "chest_crop_b.nii.gz",
            "kind": "real",
            "format": "nifti",
        },
        {
            "id": "deeplesion_000001_01_01",
            "path": root / "deeplesion_png" / "000001_01_01",
            "kind": "real",
            "format": "deeplesion_png",
        },
        {
            "id": "deeplesion_000001_02_01",
            "path": root / "deeplesion_png" / "000001_02_01",
            "kind": "real",
            "format": "deeplesion_png",
        },
        {
            "id": "lung_pet_ct_dx_a0001",
            "path": root / "lung_pet_ct_dx" / "A0001_philips_5mm",
            "kind": "real",
            "format": "dicom",
        },
        {
            "id": "lung_pet_ct_dx_a0002",
            "path": root / "lung_pet_ct_dx" / "A0002_siemens_b40f_8mm",
            "kind": "real",
            "format": "dicom",
        },
    ]
    missing = [str(c["path"]) for c in cases if not c["path"].exists()]
    if missing:
        raise FileNotFoundError(
            f"shared real CT data not found: {', '.join(missing)} (set LUNGSEG_SHARED_DATA to the shared/data folder)"
        )
    return cases


def fetch_pyradiomics(out_dir: Path, cache_dir: Path) -> list[Path]:
    """Download the pyradiomics 3.0.1 sdist through pip and extract its chest CT NRRDs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [out_dir / name for name in PYRADIOMICS_FILES]
    if all(t.exists() for t in targets):
        return targets
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarballs = sorted(cache_dir.glob("pyradiomics-3.0.1*.tar.gz"))
    if not tarballs:
        log.info("fetching %s source distribution through pip (34 MB)", PYRADIOMICS)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-build-isolation",
            "--no-binary",
            ":all:",
            "-q",
            "-d",
            str(cache_dir),
            PYRADIOMICS,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        tarballs = sorted(cache_dir.glob("pyradiomics-3.0.1*.tar.gz"))
        if result.returncode != 0 or not tarballs:
            raise RuntimeError(
                f"could not fetch {PYRADIOMICS} with pip (needs numpy and versioneer installed): {result.stderr.strip()[-500:]}"
            )
    with tarfile.open(tarballs[0]) as tar:
        members = {
            Path(m.name).name: m for m in tar.getmembers() if m.name.endswith(PYRADIOMICS_FILES) and "/data/" in m.name
        }
        for target in targets:
            if target.exists():
                continue
            member = members.get(target.name)
            if member is None:
                raise RuntimeError(f"{tarballs[0]}: {target.name} not found in the pyradiomics source distribution")
            with tar.extractfile(member) as src, atomic_path(target) as tmp:
                Path(tmp).write_bytes(src.read())
    return targets


def pydicom_ct_slice() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


def make_phantoms(
    out_dir: Path, n: int, seed: int = 0, prefix: str = "phantom", shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING
) -> list[dict]:
    """``n`` phantoms ``<prefix>_000``... from seeds ``seed``, ``seed + 1``, ...; those on disk are reused
    (so give each ``shape``/``spacing`` its own ``out_dir``)."""
    from tqdm.auto import tqdm

    from common.phantom import generate_phantom, phantom_paths, write_phantom

    cases = []
    for i in tqdm(range(n), desc="phantoms", unit="case"):
        case_id = f"{prefix}_{i:03d}"
        paths = phantom_paths(out_dir, case_id)
        if not all(p.exists() for p in paths.values()):
            write_phantom(generate_phantom(shape=tuple(shape), spacing=tuple(spacing), seed=seed + i), out_dir, case_id)
        cases.append(
            {
                "id": case_id,
                "path": paths["ct"],
                "label": paths["label"],
                "lungs": paths["lungs"],
                "report": paths["report"],
                "kind": "phantom",
                "format": "nifti",
                "seed": seed + i,
            }
        )
    return cases


def prepare_default_data(out: str | Path = DEFAULT_OUT, n_phantoms: int = 10, fetch: bool = True) -> dict:
    """Assemble every default case and write ``manifest.json``; returns the manifest."""
    out = Path(out)
    cases = shared_cases()
    notes = []
    if fetch:
        try:
            fetch_pyradiomics(out / "pyradiomics", REPO_ROOT / ".cache" / "downloads")
            for name in ("lung1", "lung2"):
                cases.append(
                    {
                        "id": f"pyradiomics_{name}",
                        "path": out / "pyradiomics" / f"{name}_image.nrrd",
                        "tumour_label": out / "pyradiomics" / f"{name}_label.nrrd",
                        "kind": "real",
                        "format": "nrrd",
                    }
                )
        except RuntimeError as e:
            notes.append(str(e))
            log.warning("%s", e)
    cases.append(
        {
            "id": "pydicom_ct_small",
            "path": pydicom_ct_slice(),
            "kind": "real",
            "format": "dicom",
            "note": "one 128x128 slice: QC excludes it (too few slices)",
        }
    )
    cases += make_phantoms(out / "phantoms", n_phantoms)
    manifest = {"cases": cases, "notes": notes, "shared_data": shared_data_dir()}
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def load_manifest(out: str | Path = DEFAULT_OUT) -> dict:
    import json

    path = Path(out) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `make data` (python -m common.default_data) first")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare the embedded default data (real scans + phantoms).")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--phantoms", type=int, default=10)
    parser.add_argument("--no-fetch", action="store_true", help="skip fetching pyradiomics' CTs through pip")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    manifest = prepare_default_data(args.out, args.phantoms, fetch=not args.no_fetch)
    kinds = {}
    for c in manifest["cases"]:
        kinds[c["kind"]] = kinds.get(c["kind"], 0) + 1
    print(
        f"default data: {len(manifest['cases'])} cases ({', '.join(f'{v} {k}' for k, v in kinds.items())}); manifest {Path(args.out) / 'manifest.json'}"
    )
    for note in manifest["notes"]:
        print("note:", note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
