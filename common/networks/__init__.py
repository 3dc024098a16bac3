"""Networks: the SAM-family models and the text encoders, loaded offline."""

from common.networks.sam_family import VARIANTS, SamFamily, SamVariant, litemedsam_checkpoint, load_sam_family, load_state_dict_strict
from common.networks.text_encoder import TextEncoder, default_text_encoder_path

__all__ = [
    "VARIANTS",
    "SamFamily",
    "SamVariant",
    "TextEncoder",
    "default_text_encoder_path",
    "litemedsam_checkpoint",
    "load_sam_family",
    "load_state_dict_strict",
]
