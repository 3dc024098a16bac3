"""The anatomical classes of the project, in channel order, shared by every stage."""

CLASS_NAMES: tuple[str, ...] = ("lung", "heart", "blood vessel", "airway", "bone")

# Label-map values: 0 is background, then one value per class in CLASS_NAMES order.
BACKGROUND = 0
LUNG, HEART, VESSEL, AIRWAY, BONE = 1, 2, 3, 4, 5
LABEL_OF = dict(zip(CLASS_NAMES, (LUNG, HEART, VESSEL, AIRWAY, BONE)))

# Lung-side map values (a separate map: the whole pleural cavity of each lung).
RIGHT_LUNG, LEFT_LUNG = 1, 2
