"""A MONAI Dataset that skips samples it cannot load, and a collate that carries what was skipped.

A missing or unreadable image found mid-epoch must not stop training: the sample is dropped from
its batch and reported (file and reason) in the batch's ``skipped`` list, which works across
DataLoader worker processes; the trainer adds them up and a handler prints the count at the end.
"""

from __future__ import annotations

import logging

from monai.data import Dataset, list_data_collate

log = logging.getLogger(__name__)
SKIPPED_KEY = "skipped"


class _Skipped:
    """Stands in a batch for a sample that failed to load."""

    __slots__ = ("image", "reason")

    def __init__(self, image: str, reason: str):
        self.image, self.reason = image, reason


class SkippingDataset(Dataset):
    """``monai.data.Dataset`` whose failing items become skip markers instead of exceptions.

    ``check_files=True`` also drops entries whose ``image_key`` file does not exist before the first
    epoch (listed in ``missing``), so a bad datalist is reported once at start-up.
    """

    def __init__(self, data, transform=None, image_key: str = "image", check_files: bool = True):
        from pathlib import Path

        data = list(data)
        self.missing: list[dict] = []
        if check_files:
            kept = []
            for item in data:
                path = item.get(image_key)
                if path is None or not Path(str(path)).exists():  # a file, or a DICOM series folder
                    self.missing.append({"image": str(path), "reason": "file not found"})
                    log.warning("%s: file not found; sample skipped", path)
                else:
                    kept.append(item)
            data = kept
        if not data and self.missing:  # an empty datalist is nothing to do, not an error
            raise ValueError(f"no usable samples: all {len(self.missing)} entries name missing files (first: {self.missing[0]['image'] if self.missing else None})")
        super().__init__(data, transform)
        self.image_key = image_key

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except Exception as e:
            image = str(self.data[index].get(self.image_key))
            # MONAI wraps transform errors; the innermost cause says what is wrong with the file.
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            reason = f"{type(cause).__name__}: {cause}"
            log.warning("%s: cannot be loaded (%s); sample skipped", image, reason)
            return _Skipped(image, reason)


def collate_skipping(batch: list):
    """``list_data_collate`` of the loaded samples, plus ``skipped``: [(image, reason), ...]."""
    skipped = [(b.image, b.reason) for b in batch if isinstance(b, _Skipped)]
    kept = [b for b in batch if not isinstance(b, _Skipped)]
    out = list_data_collate(kept) if kept else {}
    out[SKIPPED_KEY] = skipped
    return out


__all__ = ["SKIPPED_KEY", "SkippingDataset", "collate_skipping"]
