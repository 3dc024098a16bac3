"""The phantom's result type and the Hounsfield units and names its parts share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.classes import AIRWAY, BONE, HEART, LUNG, VESSEL
from common.io.volume import CTVolume


F32 = np.float32
AIR_HU = -1000.0
PAD_HU = -1024.0
FAT_HU = -95.0
MED_FAT_HU = -85.0
MUSCLE_HU = 45.0
LUNG_OR_BG = -1  # layer label: LUNG inside the lungs, background elsewhere
_CLASS_OF_LABEL = {LUNG: "lung", HEART: "heart", VESSEL: "blood vessel", AIRWAY: "airway", BONE: "bone"}
_ORDINAL = {1: "1st", 2: "2nd", 3: "3rd"}


@dataclass
class Phantom:
    """A generated chest CT with its ground truth (see the module docstring for conventions)."""

    ct: CTVolume
    labels: np.ndarray
    lungs: np.ndarray
    report: list[str]
    captions: list[dict]
    meta: dict[str, Any] = field(default_factory=dict)
