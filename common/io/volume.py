"""The one volume type every reader returns: HU values on a voxel grid with a RAS affine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class CTReadError(ValueError):
    """A scan could not be read. The message always names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def check_affine(affine: np.ndarray, path: str | Path) -> np.ndarray:
    """Return a float64 4x4 affine or raise CTReadError when it cannot map voxels to millimetres."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise CTReadError(path, f"affine has shape {affine.shape}, expected (4, 4)")
    if not np.all(np.isfinite(affine)):
        raise CTReadError(path, "broken affine: it contains NaN or infinite values")
    if not np.allclose(affine[3], [0, 0, 0, 1]):
        raise CTReadError(path, f"broken affine: last row is {affine[3].tolist()}, expected [0, 0, 0, 1]")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing < 1e-6) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise CTReadError(
            path, f"broken affine: singular direction matrix (voxel spacing {spacing.round(6).tolist()} mm)"
        )
    return affine


def reorient_array(array: np.ndarray, affine: np.ndarray, axcodes: str = "LPS") -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip the voxel axes of an [i, j, k] array (a volume or a mask on it) to ``axcodes``."""
    from nibabel import orientations as ornt

    transform = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(tuple(axcodes)))
    out = ornt.apply_orientation(array, transform)
    return np.ascontiguousarray(out), affine @ ornt.inv_ornt_aff(transform, array.shape)


@dataclass
class CTVolume:
    """A CT scan in Hounsfield units.

    ``hu`` is indexed ``[i, j, k]`` (columns, rows, slices for axial DICOM), the same voxel order
    as nibabel and MONAI's ``LoadImage``; ``affine`` maps ``(i, j, k, 1)`` to RAS millimetres.
    ``meta`` carries what the reader learnt from the headers (source, modality, series UID,
    slice positions, gantry tilt, ...) that quality control needs.
    """

    hu: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.hu.ndim != 3:
            raise CTReadError(self.meta.get("source", "<array>"), f"expected a 3D volume, got shape {self.hu.shape}")
        self.affine = check_affine(self.affine, self.meta.get("source", "<array>"))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def source(self) -> str:
        return str(self.meta.get("source", ""))

    def reorient(self, axcodes: str = "LPS") -> "CTVolume":
        """The same scan with voxel axes permuted/flipped to ``axcodes`` (e.g. "LPS": DICOM's display order)."""
        hu, affine = reorient_array(self.hu, self.affine, axcodes)
        return CTVolume(hu, affine, dict(self.meta))

    def to_nifti(self, path: str | Path, dtype=np.int16) -> Path:
        """Write as NIfTI (int16 HU by default) via a temporary name, then rename."""
        from common.io.nifti import save_nifti_array

        data = (
            np.clip(np.rint(self.hu), -32768, 32767).astype(dtype)
            if np.issubdtype(dtype, np.integer)
            else self.hu.astype(dtype)
        )
        return save_nifti_array(data, self.affine, path, dtype, xyz_units="mm", sform=False)
