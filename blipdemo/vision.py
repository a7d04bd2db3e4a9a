"""The ViT image encoder of BLIP-2 / InstructBLIP (EVA ViT-g/14 in the Salesforce checkpoints).

Notable features:
- attribute names equal the checkpoint keys under ``vision_model.`` (``embeddings.patch_embedding``,
  ``encoder.layers.N.self_attn.qkv``, ``post_layernorm``), so loading is a plain state-dict copy;
- one fused ``qkv`` projection and ``F.scaled_dot_product_attention``;
- everything is read from the transformers vision config: width, depth, heads, patch and image size,
  ``qkv_bias``, ``hidden_act`` (``gelu`` for EVA, ``quick_gelu`` for CLIP), ``layer_norm_eps``;
- BLIP-Diffusion's CLIP-style encoder (``visual_encoder.`` in diffusers' layout) is the same module with a
  ``pre_layernorm`` before the blocks and a patch embedding without bias.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


class VisionEmbeddings(nn.Module):
    """Patch embedding + class token + learned positions."""

    def __init__(self, config, patch_bias: bool = True) -> None:
        super().__init__()
        width = config.hidden_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, width))
        self.patch_embedding = nn.Conv2d(
            3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=patch_bias
        )
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.zeros(1, num_positions, width))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # (B, D, gh, gw)
        gh, gw = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)  # (B, gh*gw, D)
        cls = self.class_embedding.to(dtype).expand(patches.shape[0], -1, -1)
        x = torch.cat([cls, patches], dim=1)  # (B, 1 + gh*gw, D)
        return x + self._positions(gh, gw).to(dtype)

    def _positions(self, gh: int, gw: int) -> torch.Tensor:
        """Learned positions, bicubically resized when the image grid differs from the trained one."""
        pos = self.position_embedding
        n = pos.shape[1] - 1
        if gh * gw == n and gh == gw:
            return pos
        side = math.isqrt(n)
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, side, side)
        grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([pos[:, :1], grid], dim=1)


class VisionAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (bias on q and v only, as EVA)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        width = config.hidden_size
        # The checkpoints store one fused bias [q_bias ; 0 ; v_bias] as ``qkv.bias`` when qkv_bias is set.
        self.qkv = nn.Linear(width, 3 * width, bias=config.qkv_bias)
        self.projection = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, nh, T, hs)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs)
        return self.projection(out.transpose(1, 2).reshape(B, T, D))


class VisionMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config) -> None:
        super().__init__()
        self.self_attn = VisionAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoderStack(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))


class VisionModel(nn.Module):
    """ViT: ``pixel_values`` (B, 3, H, W) → image tokens (B, 1 + (H/p)·(W/p), D), CLS first.

    ``clip_style``: BLIP-Diffusion's encoder — a ``pre_layernorm`` over the embeddings and no patch bias.
    """

    def __init__(self, config, clip_style: bool = False) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config, patch_bias=not clip_style)
        if clip_style:
            self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = VisionEncoderStack(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode images into patch tokens (CLS token first), after the final LayerNorm."""
        x = self.embeddings(pixel_values)
        if hasattr(self, "pre_layernorm"):
            x = self.pre_layernorm(x)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)

    @property
    def grid_size(self) -> int:
        """Patches per side at the trained image size."""
        return self.config.image_size // self.config.patch_size
