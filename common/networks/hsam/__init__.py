"""H-SAM (Cheng et al., CVPR 2024, "Unleashing the Potential of SAM for Medical Adaptation via
Hierarchical Decoding") on any SAM-family backbone.

- The image encoder is frozen; ``peft`` puts LoRA bypasses on its attention projections, and only
  those train.
- Stage 1 is the backbone's own mask decoder, prompt-free by default (the prompt encoder's no-prompt
  embeddings), giving a prior at the decoder's low resolution (4x the embedding grid: 256 px).
- Stage 2 is the hierarchical decoder: mask-guided self-attention over the stage-1 image tokens,
  prior-guided cross-attention from a mask token, and a U-Net-like pixel decoder with skips from the
  stage-1 pixel decoder, finished at the input slice's own resolution with a skip from the image.
- The output is Eq. 14: ``alpha * p1 + (1 - alpha) * p2``.

Slices go in as ``(B, 1, H, W)`` in the HU window mapped to [0, 1]; the backbone's own
preprocessing (:meth:`SamFamily.preprocess`) resizes and normalises them.
"""

from common.networks.hsam.attention import MaskGuidedSelfAttention, PriorGuidedCrossAttention
from common.networks.hsam.decoder import HierarchicalDecoder, HierarchicalPixelDecoder
from common.networks.hsam.model import CHECKPOINT_FORMAT, HSam, LungProbability, native_bfloat16
from common.networks.hsam.build import build_hsam

__all__ = [
    "CHECKPOINT_FORMAT",
    "MaskGuidedSelfAttention",
    "PriorGuidedCrossAttention",
    "HierarchicalPixelDecoder",
    "HierarchicalDecoder",
    "LungProbability",
    "native_bfloat16",
    "HSam",
    "build_hsam",
]
