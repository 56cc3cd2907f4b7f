"""Tokenizers: one interface, ``tokenizer(texts) -> (input_ids, attention_mask)``, both
``[B, N]`` int64 with ``N <= max_tokens`` ([CLS] and [SEP] included, padding on the right).

- :class:`SceneTokenizer`: word-level, built with the ``tokenizers`` library from the
  generated scenes' vocabulary (for a BERT trained from scratch on them);
- :class:`HFTokenizer`: a HuggingFace tokenizer loaded from a local model folder (BERT's
  WordPiece for COCO / Flickr30K). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.normalizers import Lowercase
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from torch import Tensor

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class SceneTokenizer:
    """Word-level tokenizer over ``words`` with BERT's special tokens (``[PAD]`` is id 0)."""

    def __init__(self, words: list[str], max_tokens: int = 32) -> None:
        if max_tokens < 3:
            raise ValueError(f"max_tokens: expected at least 3, got {max_tokens}")
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        for word in words:
            vocab.setdefault(word, len(vocab))
        tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
        tok.normalizer = Lowercase()
        tok.pre_tokenizer = Whitespace()
        tok.post_processor = TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        tok.enable_truncation(max_length=max_tokens)
        tok.enable_padding(pad_id=0, pad_token="[PAD]")
        self.tokenizer = tok
        self.max_tokens = max_tokens
        self.vocab_size = len(vocab)

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        return ids, mask


class HFTokenizer:
    """A HuggingFace tokenizer from a local folder, truncating to ``max_tokens``."""

    def __init__(self, folder: str | Path, max_tokens: int = 32) -> None:
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"data.tokenizer / model.text.pretrained: no folder at {folder}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.max_tokens = max_tokens
        self.vocab_size = len(self.tokenizer)

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        out = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens,
            return_tensors="pt",
        )
        return out["input_ids"].long(), out["attention_mask"].long()
