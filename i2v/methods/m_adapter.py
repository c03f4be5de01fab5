"""M-adapter (Li, Xu, Wu, Li, Yang, Shen, Kittler; CVIU 249, 104150, 2024) as reconstructed from its abstract.

What is public: a parallel branch beside the frozen image model, fed by the model's multi-level outputs and built by
hierarchically combining "multi-level output adapters", each with a fusion module and a temporal module; gradients
never enter the backbone. No code, widths, tap layers or head are published, so this is i2v's reconstruction
(design notes in shared/METHODS.md §4, closest public relative: EVL):

    taps at K levels (default every 3rd block, ending at the last) -> for level k:
      fusion:   f_k = Linear(LN(tap_k)) (B*T, 1+L, d);   s = f_1 (k = 1),   s = s + g_k * f_k (k > 1, g_k zero-init)
      temporal: patches  s_p += PW(DWConv3d_(k_t,3,3)(LN(s_p)))       local space-time motion
                tokens   s_c += MHA_T(LN(s_c + pos_t))                 class token of each frame attends over time
    -> LN -> [mean over T of class tokens ; mean over T, L of patches] -> Dropout -> Linear -> (B, K)

The zero-initialised gates make training start from the first level's path and open the others gradually.
"""

from __future__ import annotations

import torch
from torch import nn

from i2v.layers import from_video_grid, linear_head, to_video_grid
from i2v.methods import register_method
from i2v.methods.base import VideoMethod


class MAdapterLevel(nn.Module):
    """One multi-level output adapter: fusion module + temporal module."""

    def __init__(self, D: int, d: int, heads: int, grid: tuple[int, int], kernel_t: int, num_frames: int, gated: bool):
        super().__init__()
        self.grid = grid
        self.fuse = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, d))
        self.gate = nn.Parameter(torch.zeros(d)) if gated else None
        self.ln_conv = nn.LayerNorm(d)
        self.dwconv = nn.Conv3d(d, d, (kernel_t, 3, 3), padding=(kernel_t // 2, 1, 1), groups=d)
        self.pw = nn.Linear(d, d)
        self.pos_t = nn.Parameter(torch.zeros(num_frames, d))
        self.ln_attn = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, s: torch.Tensor | None, tap: torch.Tensor, T: int) -> torch.Tensor:
        """s: (B*T, 1+L, d) branch state or None; tap: (B*T, 1+L, D) backbone tokens of this level."""
        f = self.fuse(tap)
        s = f if s is None else s + self.gate * f
        cls, p = s[:, :1], s[:, 1:]
        p = p + self.pw(from_video_grid(self.dwconv(to_video_grid(self.ln_conv(p), T, self.grid))))
        c = cls.unflatten(0, (-1, T)).squeeze(2) + self.pos_t  # (B, T, d)
        h = self.ln_attn(c)
        c = c + self.attn(h, h, h, need_weights=False)[0]
        return torch.cat([c.flatten(0, 1).unsqueeze(1), p], dim=1)


@register_method("m_adapter")
class MAdapter(VideoMethod):
    backbone_no_grad = True

    def __init__(self, cfg, backbone, num_classes, num_frames):
        super().__init__(cfg, backbone, num_classes, num_frames)
        depth, d = len(backbone.blocks), cfg.width
        if d % cfg.num_heads:
            raise ValueError(f"method.width: {d} must be divisible by method.num_heads={cfg.num_heads}")
        indices = cfg.indices if cfg.indices is not None else list(range(depth - 1, -1, -3))[::-1]
        self.indices = backbone.take_indices(indices)
        self.levels = nn.ModuleList(
            MAdapterLevel(backbone.width, d, cfg.num_heads, backbone.grid_size, cfg.kernel_t, num_frames, gated=k > 0)
            for k in range(len(self.indices))
        )
        self.norm = nn.LayerNorm(d)
        self.head = linear_head(2 * d, num_classes, cfg.head_dropout)

    def no_weight_decay(self) -> set[str]:
        return {f"levels.{k}.{n}" for k in range(len(self.levels)) for n in ("pos_t", "gate")}

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        B, T = video.shape[:2]
        with torch.no_grad():
            patches, prefix = self.backbone(video, self.indices)  # lists of (B, T, L, D), (B, T, 1, D)
        dtype = self.norm.weight.dtype
        s = None
        for level, p, c in zip(self.levels, patches, prefix, strict=True):
            s = level(s, torch.cat([c[:, :, :1], p], dim=2).flatten(0, 1).to(dtype), T)
        s = self.norm(s).unflatten(0, (B, T))  # (B, T, 1+L, d)
        pooled = torch.cat([s[:, :, 0].mean(1), s[:, :, 1:].mean((1, 2))], dim=-1)  # (B, 2d)
        return self.head(pooled)
