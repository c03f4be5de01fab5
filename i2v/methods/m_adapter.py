"""M-adapter (Li, Xu, Wu, Li, Yang, Shen, Kittler; CVIU 249, 104150, 2024) as reconstructed from its abstract.

What is public: a parallel branch beside the frozen image model, fed by the model's multi-level outputs and built by
hierarchically combining "multi-level output adapters", each with a fusion module and a temporal module; gradients
never enter the backbone. No code, widths, tap layers or head are published, so this is i2v's reconstruction
(design notes in shared/METHODS.md §4; closest public relatives: EVL for the taps, the per-frame query and the
frame-to-frame correlation, Side4Video for the side state, TransNeXt's ConvGLU for the space-time mixer):

    taps at K levels (default every 3rd block, ending at the last); branch state s (B*T, 1+L, d) = [class ; patches]
    level 0 (pixels, `pixel_embed`): s = [0 ; BN3d(Conv3d_(3,P,P), stride (1,P,P)(video))]   P: the tower's patch size
    for level k = 1..K:
      fusion    s = s + f_k                           f_k = Linear(LN(tap_k)): the level's tokens, projected
      temporal  p += LocalCorr(LN(p))                 patches: softmax_o(z_t(i) . z_t+1(i+o)), o in a 3x3 window
                p += ConvGLU3d(BN3d(p))               patches: fc1 -> GELU(DWConv3d_(k_t,3,3)(a)) * v -> fc2
                c += MHA(LN(c), LN(p_t))              each frame's class token attends over that frame's patches
                c += MHA_T(LN(c + pos_t))             class tokens attend over time
                p += Linear(LN(c_t))                  each frame's clip-aware class token, broadcast to its patches
    -> [mean over T of class tokens ; mean over T, H, W of BN3d(patches)] -> Dropout -> Linear -> (B, K)

Why each choice (the first reconstruction could not tell a clip from its time reversal, i2v issue 15):
- Motion is read from the patch tokens, nonlinearly, before any pooling. A linear space-time filter followed by a
  global mean is (up to borders) the same filter applied to the mean frame, which forgets the order of frames.
  The local correlation (EVL's q(t) . k(t+1) temporal cross-attention, restricted to a window) turns "where did
  this patch's content go" into features, so the direction of motion is explicit; the ConvGLU's product
  GELU(conv(a)) * v is second-order, so its mean over (T, H, W) keeps order-dependent space-time patterns.
- The two streams interact both ways at every level: the class token pools its frame's patches by attention
  (content-dependent, so the position of what moves reaches the temporal attention), and the class tokens, after
  attending over time, are broadcast back into the patches that the next level's modules process.
- The lowest "level" is the input itself: a Conv3d patch embedding of the raw clip (kernel (3, P, P) + BatchNorm3d,
  Side4Video's side patch embedding) starts the patch state, and each tapped level's fusion adds to it. The frozen
  tower's tokens are made for still images; where an object moves less than a patch per frame (the synthetic
  benchmark: 8-pixel patches, random-init tower) they blur the motion, while the pixel embedding sees it in its
  3-frame kernel. Smoke benchmark (move left / right, 4 epochs, Ray): 0.898 val top-1 without it, 1.000 with it.
  `method.pixel_embed=false` turns it off (the taps alone). As in Side4Video, the conv's bias is redundant before the
  BatchNorm (its gradient is 0 up to rounding); it is kept so the layer is the reference's.
- BatchNorm3d, not LayerNorm, on the patch tokens where they enter a space-time filter or the pooling (the pixel
  embedding, the ConvGLU's input, before the mean): LayerNorm normalises each token over its channels, so on a clip
  that is mostly static background every token keeps the same large common component and the few tokens of the moving
  object barely move the mean; BatchNorm centres each channel over the batch and all positions, so what the pooled
  feature keeps is what differs between clips. Measured on the 8-class synthetic set (rotations, grow / shrink,
  appear / disappear; 4 epochs, lr 2e-3, in-process replica of the 2-worker run, width 64): LayerNorm everywhere
  0.188; BN on the pixel embedding only 0.266; BN before the pooling only 0.211; both 0.504; both + before the ConvGLU
  0.621 (0.578 at the default width 384; Side4Video 0.570 in the same replica). BN before the correlation instead of
  LN, an MLP per level, or pooling the patches alone did not help (0.32-0.41 where measured). The class tokens are
  pooled as they are (their path ends in residual attention outputs; they carry the clip-level temporal attention).
- Levels are combined hierarchically by addition: each level's fusion feeds the state that the previous levels'
  temporal modules produced, and the last state is pooled. All pre-norm residual; no gates and no zero-initialised
  projections, so every parameter of every level receives a gradient from the first step (tested; a zero gate on a
  zero-initialised projection receives none). The correlation and ConvGLU layers start with unit-variance weights
  (`lecun_normal_`): with PyTorch's default init the softmax starts flat and the gated product nearly linear, and
  learning stalled for the first epochs. `pos_t` starts at zero (it still receives a gradient).
- Memory: the backbone runs under `no_grad` (nothing of it is kept for backward); each level keeps its LayerNorm'd tap
  and a few (B*T, L, d) tensors of its own (a BatchNorm keeps its input, as the LayerNorm it replaced did), so the
  branch stays far below in-block adapters (`i2v bench train`).
"""

from __future__ import annotations

import torch
from torch import nn

from i2v.layers import ConvGLU3d, LocalCorrelation, from_video_grid, linear_head, to_video_grid
from i2v.methods import register_method
from i2v.methods.base import VideoMethod


class MAdapterLevel(nn.Module):
    """One multi-level output adapter: fusion module (`fuse`) + temporal module (the rest)."""

    def __init__(
        self,
        D: int,
        d: int,
        heads: int,
        grid: tuple[int, int],
        kernel_t: int,
        num_frames: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grid = grid
        self.fuse = nn.Sequential(nn.LayerNorm(D, **dd), nn.Linear(D, d, **dd))
        self.ln_corr = nn.LayerNorm(d, **dd)
        self.corr = LocalCorrelation(d, heads, grid, **dd)
        self.bn_st = nn.BatchNorm3d(d, **dd)
        self.st = ConvGLU3d(d, d, grid, (kernel_t, 3, 3), **dd)
        self.ln_q, self.ln_kv = nn.LayerNorm(d, **dd), nn.LayerNorm(d, **dd)
        self.pool = nn.MultiheadAttention(d, heads, batch_first=True, **dd)
        self.pos_t = nn.Parameter(torch.zeros(num_frames, d, **dd))
        self.ln_t = nn.LayerNorm(d, **dd)
        self.attn_t = nn.MultiheadAttention(d, heads, batch_first=True, **dd)
        self.ln_bcast = nn.LayerNorm(d, **dd)
        self.bcast = nn.Linear(d, d, **dd)

    def forward(self, s: torch.Tensor | None, tap: torch.Tensor, T: int) -> torch.Tensor:
        """s: (B*T, 1+L, d) branch state or None (first level); tap: (B*T, 1+L, D) backbone tokens of this level."""
        f = self.fuse(tap)
        s = f if s is None else s + f
        c, p = s[:, :1], s[:, 1:]  # (B*T, 1, d), (B*T, L, d)
        p = p + self.corr(self.ln_corr(p), T)
        p = p + self.st(from_video_grid(self.bn_st(to_video_grid(p, T, self.grid))), T)
        kv = self.ln_kv(p)
        c = c + self.pool(self.ln_q(c), kv, kv, need_weights=False)[0]
        c = c.unflatten(0, (-1, T)).squeeze(2) + self.pos_t  # (B, T, d)
        h = self.ln_t(c)
        c = (c + self.attn_t(h, h, h, need_weights=False)[0]).flatten(0, 1).unsqueeze(1)  # (B*T, 1, d)
        p = p + self.bcast(self.ln_bcast(c))  # broadcast over the L patches of the frame
        return torch.cat([c, p], dim=1)


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
            MAdapterLevel(backbone.width, d, cfg.num_heads, backbone.grid_size, cfg.kernel_t, num_frames)
            for _ in self.indices
        )
        self.pixel_level = cfg.pixel_embed
        if self.pixel_level:
            P = backbone.image_size[0] // backbone.grid_size[0]  # the tower's patch size: a pixel token per patch token
            self.pixel_embed = nn.Conv3d(3, d, (3, P, P), stride=(1, P, P), padding=(1, 0, 0))
            self.pixel_norm = nn.BatchNorm3d(d)
        self.grid = backbone.grid_size
        self.post_bn = nn.BatchNorm3d(d)
        self.head = linear_head(2 * d, num_classes, cfg.head_dropout)

    def no_weight_decay(self) -> set[str]:
        return {f"levels.{k}.pos_t" for k in range(len(self.levels))}

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        B, T = video.shape[:2]
        with torch.no_grad():
            patches, prefix = self.backbone(video, self.indices)  # lists of (B, T, L, D), (B, T, 1, D)
        dtype = self.post_bn.weight.dtype
        s = None
        if self.pixel_level:
            pix = from_video_grid(self.pixel_norm(self.pixel_embed(video.transpose(1, 2).to(dtype))))  # (B*T, L, d)
            s = torch.cat([pix.new_zeros(pix.shape[0], 1, pix.shape[2]), pix], dim=1)
        for level, p, c in zip(self.levels, patches, prefix, strict=True):
            s = level(s, torch.cat([c[:, :, :1], p], dim=2).flatten(0, 1).to(dtype), T)
        cls = s[:, 0].unflatten(0, (B, T)).mean(1)  # (B, d)
        patches = self.post_bn(to_video_grid(s[:, 1:], T, self.grid)).mean((2, 3, 4))  # (B, d)
        pooled = torch.cat([cls, patches], dim=-1)  # (B, 2d)
        return self.head(pooled)
