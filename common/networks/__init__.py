"""Networks: the SAM-family models, the text encoders, the SA-1 CLIP-like model and its teacher, loaded offline."""

from common.networks.checkpoint import (
    for_inference,
    load_network,
    read_checkpoint,
    release_checkpoint,
    save_network,
    unwrap,
)
from common.networks.clip import DistillationHead, LungCLIP, build_lung_clip
from common.networks.image_encoders import IMAGE_ENCODERS, ImageEncoder, build_image_encoder
from common.networks.parameters import parameter_counts, parameter_groups
from common.networks.sam_family import (
    VARIANTS,
    SamFamily,
    SamVariant,
    litemedsam_checkpoint,
    load_sam_family,
    load_state_dict_strict,
)
from common.networks import hsam  # noqa: F401  (registers H-SAM's checkpoint format for load_network)
from common.networks.teacher import Teacher, TeacherCache, cache_key
from common.networks.text_encoder import TextEncoder, default_text_encoder_path

__all__ = [
    "IMAGE_ENCODERS",
    "VARIANTS",
    "DistillationHead",
    "ImageEncoder",
    "LungCLIP",
    "SamFamily",
    "SamVariant",
    "Teacher",
    "TeacherCache",
    "TextEncoder",
    "build_image_encoder",
    "for_inference",
    "build_lung_clip",
    "cache_key",
    "default_text_encoder_path",
    "litemedsam_checkpoint",
    "load_network",
    "load_sam_family",
    "load_state_dict_strict",
    "parameter_counts",
    "parameter_groups",
    "read_checkpoint",
    "release_checkpoint",
    "save_network",
    "unwrap",
]
