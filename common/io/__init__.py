"""Ingest: every CT format the project reads, one volume type (HU + RAS affine), MONAI reader, atomic writes."""

from common.io.atomic import atomic_path, remove_stale_temporaries, write_json_atomic, write_text_atomic
from common.io.dicom import (
    DicomSeries,
    choose_ct_series,
    iter_dicom_series,
    read_dicom_series,
    read_rtstruct,
    scan_dicom_folder,
)
from common.io.readers import (
    format_of,
    read_ct,
    read_deeplesion_png,
    read_itk,
    read_nifti,
    read_radchestct_labels,
    read_radchestct_npz,
)
from common.io.volume import CTReadError, CTVolume, check_affine


def __getattr__(name):
    # CTReader imports MONAI; load it only when asked so that plain readers stay light.
    if name in ("CTReader", "to_metatensor"):
        from common.io import monai_reader

        return getattr(monai_reader, name)
    raise AttributeError(name)


__all__ = [
    "CTReadError",
    "CTReader",
    "CTVolume",
    "DicomSeries",
    "choose_ct_series",
    "atomic_path",
    "check_affine",
    "format_of",
    "iter_dicom_series",
    "read_ct",
    "read_deeplesion_png",
    "read_dicom_series",
    "read_itk",
    "read_nifti",
    "read_radchestct_labels",
    "read_radchestct_npz",
    "read_rtstruct",
    "remove_stale_temporaries",
    "scan_dicom_folder",
    "to_metatensor",
    "write_json_atomic",
    "write_text_atomic",
]
