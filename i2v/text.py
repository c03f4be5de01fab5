"""The open_clip text tower of a backbone's model and tag, with CLIP BPE tokenisation (text-video retrieval).

    text = load_text_tower(cfg.backbone)                      # frozen; TextEncoder.unfreeze() to train it
    tokens = tokenize(["a red square moving left"], 32)       # (N, 32) int64: SOT + at most 30 tokens + EOT, 0-padded
    feats, eot = text(tokens)                                 # (N, 32, E) per-token features, (N, E) the EOT row

Tokenisation follows Side4Video's Retrieval code (shared/RETRIEVAL_FEWSHOT.md §1.4): open_clip's SimpleTokenizer
(CLIP BPE, `basic_clean` + whitespace clean + lower case), `<|startoftext|>` + tokens cut so that the end token
fits + `<|endoftext|>`, zero-padded to `max_words`; the mask is `tokens != 0`. The tower sees the first `max_words`
position embeddings and the causal mask only (no padding mask); every position goes through `ln_final` and
`text_projection`.
"""

from __future__ import annotations

import functools
import logging

import open_clip
import torch
from open_clip.transformer import TextTransformer
from torch import nn

from i2v.backbone import model_config, read_state_dict, resolve_backbone
from i2v.config import BackboneCfg

_logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=4)
def _tokenizer(max_words: int) -> open_clip.SimpleTokenizer:
    return open_clip.SimpleTokenizer(context_length=max_words)  # the BPE file ships with open_clip (no download)


def tokenize(texts: list[str], max_words: int) -> torch.Tensor:
    """(N, max_words) int64 CLIP BPE ids: SOT + up to max_words - 2 tokens + EOT, zero-padded."""
    return _tokenizer(max_words)(list(texts), context_length=max_words).long()


def build_text_tower(name: str, quick_gelu: bool = False) -> TextTransformer:
    """The text tower of open_clip model `name` (random init) on the current default device."""
    _, cfg = model_config(name)
    text = open_clip.model._build_text_tower(cfg["embed_dim"], cfg.get("text_cfg", {}), quick_gelu=quick_gelu)
    if not isinstance(text, TextTransformer):
        raise NotImplementedError(
            f"backbone.name: {name}'s text tower is {type(text).__name__}; retrieval needs an "
            "open_clip TextTransformer (the CLIP ViT models)"
        )
    return text


def read_text_checkpoint(path: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The text-tower state dict (and `logit_scale`) of a full-CLIP checkpoint, under TextTransformer's names."""
    sd = read_state_dict(path, mmap)
    if any(k.startswith("text.") for k in sd):  # open_clip CustomTextCLIP layout
        sd = {k.removeprefix("text."): v for k, v in sd.items() if k.startswith("text.")} | (
            {"logit_scale": sd["logit_scale"]} if "logit_scale" in sd else {}
        )
    skip = ("visual.", "input_resolution", "context_length", "vocab_size", "attn_mask", "logit_bias")
    return {k: v for k, v in sd.items() if not k.startswith(skip)}


class TextEncoder(nn.Module):
    """An open_clip TextTransformer returning every position's projected feature (frozen by default).

    Attributes:
        tower: the open_clip TextTransformer (registered, so ZeRO-3 partitions it).
    """

    def __init__(self, tower: TextTransformer, max_words: int):
        super().__init__()
        if max_words > tower.context_length:
            raise ValueError(
                f"retrieval.max_words: {max_words} is longer than the text tower's context ({tower.context_length})"
            )
        self.tower = tower
        self.max_words = max_words

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.token_embedding.weight.dtype

    def external_parameters(self) -> list[nn.Parameter]:
        """The tower's direct parameters, read here rather than inside a call of the tower (ZeRO-3 must be told)."""
        return list(self.tower.parameters(recurse=False))

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L) ids -> per-token features (N, L, E) and the `<|endoftext|>` row (N, E) (EOT has the largest id)."""
        t = self.tower
        L = text.shape[1]
        x = t.token_embedding(text).to(self.dtype) + t.positional_embedding[:L].to(self.dtype)  # (N, L, W)
        x = t.transformer(x, attn_mask=t.attn_mask[:L, :L])
        x = t.ln_final(x)
        x = t.text_projection(x) if isinstance(t.text_projection, nn.Linear) else x @ t.text_projection  # (N, L, E)
        return x, x[torch.arange(len(x), device=x.device), text.argmax(-1)]


def load_text_tower(cfg: BackboneCfg, max_words: int, device: torch.device | str | None = None) -> tuple:
    """(TextEncoder, logit_scale value) of `cfg.name`, with `cfg.pretrained`'s weights (frozen, in
    `cfg.precision`). Random init without weights: logit_scale = ln(1 / 0.07) as CLIP starts."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    r = resolve_backbone(cfg, fetch=device.type != "meta")
    with device:
        tower = build_text_tower(cfg.name, quick_gelu=r.quick_gelu)
    scale = torch.tensor(1 / 0.07).log()
    if r.path is not None and device.type != "meta":
        scale = load_text_state_dict(tower, r.path)
    tower.to(DTYPES[cfg.precision]).requires_grad_(False)
    return TextEncoder(tower, max_words), scale


def load_text_state_dict(tower: TextTransformer, path: str) -> torch.Tensor:
    """Loads the text tower from a full-CLIP checkpoint; returns its `logit_scale` (every key must match)."""
    sd = read_text_checkpoint(path)
    scale = sd.pop("logit_scale", None)
    own = tower.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    wrong = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or wrong or scale is None:
        raise ValueError(
            f"backbone.pretrained: {path} does not hold the text tower retrieval needs (a full CLIP checkpoint): "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"{len(wrong)} shape mismatches {wrong[:5]}" + ("" if scale is not None else ", no logit_scale")
        )
    tower.load_state_dict(sd)
    _logger.info("loaded the text tower from %s", path)
    return scale.float().reshape(())


__all__ = ["TextEncoder", "build_text_tower", "load_text_tower", "tokenize"]
