"""The anatomical classes of the project, in channel order, shared by every stage."""

CLASS_NAMES: tuple[str, ...] = ("lung", "heart", "blood vessel", "airway", "bone")

# Label-map values: 0 is background, then one value per class in CLASS_NAMES order.
BACKGROUND = 0
LUNG, HEART, VESSEL, AIRWAY, BONE = 1, 2, 3, 4, 5
LABEL_OF = dict(zip(CLASS_NAMES, (LUNG, HEART, VESSEL, AIRWAY, BONE)))

# Lung-side map values (a separate map: the whole pleural cavity of each lung).
RIGHT_LUNG, LEFT_LUNG = 1, 2

# Background classes: SA-1 learns them from captioned patches (phantom label 0, and the air around any
# real patient, which needs no label) and SA-2 lets them take their share of the softmax, so that the
# air outside the body and the chest wall are not forced into one of the anatomical channels.
BACKGROUND_NAMES: tuple[str, ...] = ("air outside the body", "soft tissue")
PATCH_CLASSES: tuple[str, ...] = CLASS_NAMES + BACKGROUND_NAMES
