"""EncoderClassifier: ViT-style classifier (images) or CLS text classifier (token ids)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from .blocks import Trunk, check_padding_mask, check_seq_len, check_token_ids, init_normal_, make_norm
from .config import ModelConfig


class EncoderClassifier(nn.Module):
    """Image input (``patch_size`` and ``image_size`` set): x [B,C,H,W] float with
    H = W = image_size -> non-overlapping patch embedding (a strided conv) -> [CLS, patches].
    Token input: x [B,T] int ids -> token embedding -> [CLS, tokens], with an optional
    key_padding_mask [B,T] (True = real token; CLS is always real).

    Then learned positions (none when the variant applies RoPE itself), ``layers`` pre-LayerNorm
    blocks of non-causal attention, a final LayerNorm and a linear head on the CLS token:
    logits [B, num_classes]. Attention sees T + 1 tokens, at most ``max_len``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.family != "encoder":
            raise ValueError(f"EncoderClassifier needs family 'encoder', got {config.family!r}")
        self.config = config
        d = config.d_model
        if config.is_image:
            self.patch = nn.Conv2d(config.channels, d, kernel_size=config.patch_size, stride=config.patch_size)
            positions = config.num_patches + 1
        else:
            self.embed = nn.Embedding(config.vocab_size, d)
            init_normal_(self.embed.weight)
            positions = config.max_len
        self.cls = nn.Parameter(init_normal_(torch.empty(1, 1, d)))
        self.pos = None if config.uses_rope else nn.Parameter(init_normal_(torch.empty(positions, d)))
        self.trunk = Trunk(config, norm="layer")
        self.norm = make_norm("layer", d, config.norm_eps)
        self.head = nn.Linear(d, config.num_classes)

    def _embed_image(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        c = self.config
        if key_padding_mask is not None:
            raise UsageError("key_padding_mask applies to token input; an image encoder takes none")
        if x.dim() != 4 or x.shape[1] != c.channels or x.shape[2] != c.image_size or x.shape[3] != c.image_size:
            raise UsageError(
                f"EncoderClassifier takes images [batch, {c.channels}, {c.image_size}, {c.image_size}], "
                f"got a tensor of shape {list(x.shape)}"
            )
        if not x.dtype.is_floating_point:
            raise UsageError(f"EncoderClassifier takes float images, got {x.dtype}")
        return self.patch(x).flatten(2).transpose(1, 2)  # [B, patches, D]

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None
        if self.config.is_image:
            h = self._embed_image(x, key_padding_mask)
        else:
            check_token_ids(x, "EncoderClassifier (token input)")
            mask = check_padding_mask(key_padding_mask, x.shape, "the token ids")
            check_seq_len(x.shape[1] + 1, self.config.max_len, "the token ids plus CLS")
            h = self.embed(x)
        cls = self.cls.expand(h.shape[0], -1, -1)
        h = torch.cat([cls, h], dim=1)
        if mask is not None:
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        if self.pos is not None:
            h = h + self.pos[: h.shape[1]]
        h = self.norm(self.trunk(h, mask))
        return self.head(h[:, 0])
