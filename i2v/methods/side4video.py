"""Side4Video (Yao, Wu, Li; arXiv 2311.15769): a narrow spatial-temporal side network fed by the frozen backbone's
block outputs. The backbone runs under no_grad, so backward never touches it and none of its activations are kept.

    video (B, T, C, H, W) --side patch embed (Conv3d + BN3d)--> side state s (B*T, L, d)
    for every tapped block j:
        tap_j (B, T, 1+L, D) --LN + Linear--> (cls_j, p_j);  s = (s + p_j) / 2;  s = side_block_j(s, cls_j)
    s --BN3d--> mean over T, H, W --> Dropout --> Linear --> (B, K)
    retrieval (num_classes=0): s --BN3d--> mean over H, W --> (B, T, d) @ side_proj (zero init) --> + the backbone's
        last-block class token of each frame --> ln_post --> @ proj --> per-frame embeddings (B, T, E)
        (the reference's Retrieval/modules/module_clip.py; ln_post / proj are trainable copies, `FrameProjection`)

Side block (CLIP variant, pre-norm): temporal conv branch (BN3d, 1x1x1, depthwise (k,1,1), 1x1x1) + [CLS]-shift
attention (queries: patch tokens; keys/values: patches + the backbone class token shifted half forward / half
backward in time) + BN3d -> MLP. The spatial position embedding is shared by all side blocks.
EVA variant (`tap_order: linear_norm`, the reference's ViT-E configs): Linear -> LN taps, post-norm side blocks
(`EVASideBlock`) and no BN3d before the pooling.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from i2v.layers import FrameProjection, from_video_grid, linear_head, recomputed_linear, to_video_grid
from i2v.methods import register_method
from i2v.methods.base import VideoMethod


def shift_class_token(cls: torch.Tensor, T: int) -> torch.Tensor:
    """(B*T, 1, d): channels [0, d/2) take frame t+1, [d/2, d) take frame t-1, zeros past the clip ends."""
    c = cls.unflatten(0, (-1, T))  # (B, T, 1, d)
    half = c.shape[-1] // 2
    out = torch.zeros_like(c)
    out[:, :-1, :, :half] = c[:, 1:, :, :half]
    out[:, 1:, :, half:] = c[:, :-1, :, half:]
    return out.flatten(0, 1)


def split_pos(pos: torch.Tensor, L: int) -> tuple[torch.Tensor | float, torch.Tensor]:
    """(class-token row or 0, patch rows) of a side position table with L or 1 + L rows (`method.cls_pos`)."""
    return (pos[:1], pos[1:]) if len(pos) > L else (0.0, pos)


class SideBlock(nn.Module):
    def __init__(self, d: int, heads: int, grid: tuple[int, int], kernel_t: int, mlp_ratio: float, depth: int):
        super().__init__()
        self.grid = grid
        self.temporal = nn.Sequential(
            nn.BatchNorm3d(d),
            nn.Conv3d(d, d, 1),
            nn.Conv3d(d, d, (kernel_t, 1, 1), padding=(kernel_t // 2, 0, 0), groups=d),
            nn.Conv3d(d, d, 1),
        )
        # to_video_grid's permute yields channels-last activations, and the convs' weight grads come out channels-last;
        # weights kept in that layout avoid DDP's "grad strides do not match bucket view strides" copies.
        self.temporal.to(memory_format=torch.channels_last_3d)
        self.ln_attn = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.bn_mlp = nn.BatchNorm3d(d)
        hidden = int(d * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        # CLIP's init scheme, as in the reference side network
        nn.init.normal_(self.attn.in_proj_weight, std=d**-0.5)
        nn.init.normal_(self.attn.out_proj.weight, std=d**-0.5 * (2 * depth) ** -0.5)
        nn.init.normal_(self.mlp[0].weight, std=(2 * d) ** -0.5)
        nn.init.normal_(self.mlp[2].weight, std=d**-0.5 * (2 * depth) ** -0.5)

    def forward(self, s: torch.Tensor, cls: torch.Tensor, pos: torch.Tensor, T: int) -> torch.Tensor:
        """s: (B*T, L, d) side state; cls: (B*T, 1, d) projected backbone class token; pos: (L, d)."""
        s = s + from_video_grid(self.temporal(to_video_grid(s, T, self.grid)))
        cls_pos, pos = split_pos(pos, s.shape[1])
        kv = self.ln_attn(torch.cat([shift_class_token(cls, T) + cls_pos, s + pos], dim=1))  # (B*T, 1+L, d)
        s = s + self.attn(kv[:, 1:], kv, kv, need_weights=False)[0]
        return s + self.mlp(from_video_grid(self.bn_mlp(to_video_grid(s, T, self.grid))))

    def forward_lean(self, s: torch.Tensor, cls: torch.Tensor, pos: torch.Tensor, T: int) -> torch.Tensor:
        """`forward` in training, keeping for backward only each branch's input, the attention's q/k/v/output and the
        temporal branch's hidden state (8 vectors of width d per token instead of 21): the norms, the depthwise conv
        and the MLP's BN -> Linear -> GELU are recomputed in backward (`recomputed_linear`). The modules run as usual
        under no_grad (running statistics, hooks); the 1x1x1 convs are applied as the linear maps they are."""
        bn, conv1, dwconv, conv2 = self.temporal
        ln, attn, (fc1, act, fc2) = self.ln_attn, self.attn, self.mlp
        d, grid = s.shape[-1], partial(to_video_grid, T=T, grid=self.grid)

        def bn_fn(x, w, b, eps=bn.eps):  # BatchNorm3d in training, without running statistics
            return from_video_grid(F.batch_norm(grid(x), None, None, w, b, True, 0.0, eps))

        def dwconv_fn(x, w, b):
            return from_video_grid(F.conv3d(grid(x), w, b, dwconv.stride, dwconv.padding, groups=dwconv.groups))

        def ln_fn(x, w, b):
            return F.layer_norm(x, (d,), w, b, ln.eps)

        def mlp_fn(x, bn_w, bn_b, w, b, eps=self.bn_mlp.eps):  # recomputes fc1, GELU: keeps 1 vector instead of 10
            x = from_video_grid(F.batch_norm(grid(x), None, None, bn_w, bn_b, True, 0.0, eps))
            return F.gelu(F.linear(x, w, b), approximate=act.approximate)

        # temporal branch: BN -> 1x1x1 -> depthwise (k, 1, 1) -> 1x1x1, keeping s and the first conv's output
        with torch.no_grad():
            z = from_video_grid(bn(grid(s)))
        h = recomputed_linear(bn_fn, s, z, conv1.weight, conv1.bias, bn.weight, bn.bias)
        with torch.no_grad():
            z = from_video_grid(dwconv(grid(h)))
        s = s + recomputed_linear(dwconv_fn, h, z, conv2.weight, conv2.bias, dwconv.weight, dwconv.bias)
        # [CLS]-shift attention: queries from the patch rows; q, k, v from one in-projection of all 1+L rows
        cls_pos, pos = split_pos(pos, s.shape[1])
        x = torch.cat([shift_class_token(cls, T) + cls_pos, s + pos], dim=1)  # (B*T, 1+L, d)
        with torch.no_grad():
            z = ln(x)
        qkv = recomputed_linear(ln_fn, x, z, attn.in_proj_weight, attn.in_proj_bias, ln.weight, ln.bias)
        q, k, v = qkv.unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4)  # (B*T, heads, 1+L, d/heads)
        out = F.scaled_dot_product_attention(q[:, :, 1:], k, v)  # (B*T, heads, L, d/heads)
        s = s + attn.out_proj(out.transpose(1, 2).flatten(2))
        # MLP: BN -> fc1 -> GELU -> fc2, keeping s only
        with torch.no_grad():
            z = act(fc1(from_video_grid(self.bn_mlp(grid(s)))))
        params = (self.bn_mlp.weight, self.bn_mlp.bias, fc1.weight, fc1.bias)
        return s + recomputed_linear(mlp_fn, s, z, fc2.weight, fc2.bias, *params)


class EVASideBlock(nn.Module):
    """The EVA ViT-E variant of the side block (reference `eva_clip/eva_vit_model.py` `AttnCBlock`, post-norm):
    s + BN(conv(s)); s + LN(attn(patches | shifted CLS)); s + BN(MLP(s)). No norm before any branch; the attention
    has separate q/k/v projections (queries from the patches only) and every layer keeps PyTorch's default init (the
    reference's init loop matches no parameter name). Same parameter count as `SideBlock`."""

    def __init__(self, d: int, heads: int, grid: tuple[int, int], kernel_t: int, mlp_ratio: float):
        super().__init__()
        self.grid, self.heads = grid, heads
        self.conv = nn.Sequential(
            nn.Conv3d(d, d, 1),
            nn.Conv3d(d, d, (kernel_t, 1, 1), padding=(kernel_t // 2, 0, 0), groups=d),
            nn.Conv3d(d, d, 1),
        )
        self.bn_conv = nn.BatchNorm3d(d)
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.ln_attn = nn.LayerNorm(d)
        hidden = int(d * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.bn_mlp = nn.BatchNorm3d(d)

    def forward(self, s: torch.Tensor, cls: torch.Tensor, pos: torch.Tensor, T: int) -> torch.Tensor:
        """s: (B*T, L, d) side state; cls: (B*T, 1, d) projected backbone class token; pos: (L, d)."""
        s = s + from_video_grid(self.bn_conv(self.conv(to_video_grid(s, T, self.grid))))
        cls_pos, pos = split_pos(pos, s.shape[1])
        kv = torch.cat([shift_class_token(cls, T) + cls_pos, s + pos], dim=1)  # (B*T, 1+L, d)

        def heads(x: torch.Tensor) -> torch.Tensor:  # (N, L, d) -> (N, heads, L, d / heads)
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(kv[:, 1:])), heads(self.k(kv)), heads(self.v(kv)))
        s = s + self.ln_attn(self.proj(out.transpose(1, 2).flatten(2)))
        return s + from_video_grid(self.bn_mlp(to_video_grid(self.mlp(s), T, self.grid)))


@register_method("side4video")
class Side4Video(VideoMethod):
    backbone_no_grad = True

    def __init__(self, cfg, backbone, num_classes, num_frames):
        super().__init__(cfg, backbone, num_classes, num_frames)
        d, D = cfg.side_width, backbone.width
        if d % cfg.side_head_dim:
            raise ValueError(f"method.side_width: {d} must be a multiple of method.side_head_dim={cfg.side_head_dim}")
        if num_frames < cfg.kernel_t:
            raise ValueError(f"data.frames: {num_frames} is shorter than method.kernel_t={cfg.kernel_t}")
        self.indices = backbone.take_indices(cfg.indices)
        grid, patch = backbone.grid_size, backbone.image_size[0] // backbone.grid_size[0]
        self.patch_embed = nn.Sequential(
            nn.Conv3d(3, d, (3, patch, patch), stride=(1, patch, patch), padding=(1, 0, 0)), nn.BatchNorm3d(d)
        )
        self.pos = nn.Parameter(torch.randn(cfg.cls_pos + grid[0] * grid[1], d) * 0.01)
        self.taps = nn.ModuleList(self._tap(D, d, cfg.tap_order) for _ in self.indices)
        eva = cfg.tap_order == "linear_norm"  # the EVA variant: Linear -> LN taps, post-norm blocks, no post_bn
        self.blocks = nn.ModuleList(
            EVASideBlock(d, d // cfg.side_head_dim, grid, cfg.kernel_t, cfg.mlp_ratio)
            if eva
            else SideBlock(d, d // cfg.side_head_dim, grid, cfg.kernel_t, cfg.mlp_ratio, len(self.indices))
            for _ in self.indices
        )
        self.post_bn = nn.Identity() if eva else nn.BatchNorm3d(d)
        if num_classes:
            self.head = linear_head(d, num_classes, cfg.head_dropout)
        else:  # retrieval: per-frame embeddings; zero init, so training starts from CLIP's own frame embeddings
            self.side_proj = nn.Parameter(torch.zeros(d, D))
            self.frame_proj = FrameProjection(backbone)
        self.grid = grid
        self.grad_checkpointing = cfg.grad_checkpointing
        self.lean_activations = cfg.lean_activations and not eva

    @staticmethod
    def _tap(D: int, d: int, order: str) -> nn.Sequential:
        linear = nn.Linear(D, d)
        nn.init.normal_(linear.weight, std=(2 * d) ** -0.5)
        return (
            nn.Sequential(nn.LayerNorm(D), linear) if order == "norm_linear" else nn.Sequential(linear, nn.LayerNorm(d))
        )

    @staticmethod
    def _tap_lean(tap: nn.Sequential, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`tap(x.to(dtype))` keeping only the frozen tokens `x` (in the backbone's dtype) for backward: the
        LayerNorm is recomputed there, and `x` needs no gradient."""
        ln, linear = tap
        with torch.no_grad():
            z = ln(x.to(dtype))

        def ln_fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x.to(dtype), ln.normalized_shape, w, b, ln.eps)

        return recomputed_linear(ln_fn, x, z, linear.weight, linear.bias, ln.weight, ln.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"pos"}

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) -> class logits (B, K), or with num_classes=0 frame embeddings (B, T, E)."""
        B, T = video.shape[:2]
        last = len(self.backbone.blocks) - 1
        indices = self.indices if self.num_classes or last in self.indices else [*self.indices, last]
        with torch.no_grad():
            patches, prefix = self.backbone(video, indices)  # lists of (B, T, L, D), (B, T, 1, D)
        dtype = self.pos.dtype
        s = from_video_grid(self.patch_embed(video.transpose(1, 2).to(dtype)))  # (B*T, L, d)
        n = len(self.indices)
        lean = self.lean_activations and self.training and torch.is_grad_enabled()
        for tap, block, p, c in zip(self.taps, self.blocks, patches[:n], prefix[:n], strict=True):
            if lean:  # keeps the backbone's own tokens (no fp32 copy, no normalised copy)
                cls, t = (self._tap_lean(tap, x.flatten(0, 1), dtype) for x in (c[:, :, :1], p))
            else:
                t = tap(torch.cat([c[:, :, :1], p], dim=2).flatten(0, 1).to(dtype))  # (B*T, 1+L, d)
                cls, t = t[:, :1], t[:, 1:]
            s = 0.5 * s + 0.5 * t
            if self.grad_checkpointing and self.training:  # keeps the block's inputs only: recomputes the plain block
                s = checkpoint(block, s, cls, self.pos, T, use_reentrant=False)
            elif lean and not isinstance(block.bn_mlp, nn.SyncBatchNorm):  # SyncBN's backward needs the other ranks
                s = block.forward_lean(s, cls, self.pos, T)
            else:
                s = block(s, cls, self.pos, T)
        if not self.num_classes:
            side = self.post_bn(to_video_grid(s, T, self.grid)).mean((3, 4)).transpose(1, 2)  # (B, T, d)
            return self.frame_proj(prefix[-1][:, :, 0].to(dtype) + side @ self.side_proj)  # (B, T, E)
        pooled = self.post_bn(to_video_grid(s, T, self.grid)).mean((2, 3, 4))  # (B, d)
        return self.head(pooled)
