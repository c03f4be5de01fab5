"""Space-time token mixers for side branches (no parameters inside the frozen backbone).

- `ConvGLU3d`: a gated MLP whose gate path runs a depthwise space-time convolution, TransNeXt's ConvGLU
  (Shi, CVPR 2024, arXiv 2311.17132) lifted from (H, W) to (T, H, W). The product of a space-time filter response
  and a second linear feature is a nonlinear (second-order) function of the clip, so its mean over all positions
  still depends on the order of the frames, where a linear filter's mean would not.
"""

from __future__ import annotations

import torch
from torch import nn

from i2v.layers.temporal import from_video_grid, to_video_grid


def lecun_normal_(*layers: nn.Module) -> None:
    """Weights N(0, 1/fan_in), biases 0: unit-variance outputs, so gated products and attention maps start in their
    nonlinear range (PyTorch's default gives 1/3 of that variance per layer, which leaves a product of two layers
    and a softmax nearly linear/flat at the start)."""
    for m in layers:
        nn.init.normal_(m.weight, std=(m.weight[0].numel()) ** -0.5)
        nn.init.zeros_(m.bias)


class ConvGLU3d(nn.Module):
    """fc1 (d -> 2h) -> [GELU(DWConv3d(a)) * v] -> fc2 (h -> d) on patch tokens laid out as a video grid."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        grid: tuple[int, int],
        kernel: tuple[int, int, int] = (3, 3, 3),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grid = grid
        self.fc1 = nn.Linear(dim, 2 * hidden, **dd)
        self.dwconv = nn.Conv3d(
            hidden, hidden, kernel, padding=tuple(k // 2 for k in kernel), groups=hidden, **dd
        )  # kernel (k_t, k_h, k_w), same-size output
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, **dd)
        lecun_normal_(self.fc1, self.dwconv, self.fc2)
        self.dwconv.to(memory_format=torch.channels_last_3d)  # its grad's layout (to_video_grid): no DDP copy

    def forward(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """x: (B*T, H*W, d) patch tokens -> (B*T, H*W, d)."""
        a, v = self.fc1(x).chunk(2, dim=-1)  # (B*T, L, h) each
        a = from_video_grid(self.dwconv(to_video_grid(a, T, self.grid)))  # space-time filter over (T, H, W)
        return self.fc2(self.act(a) * v)


class LocalCorrelation(nn.Module):
    """Where did each patch's content go in the next frame: a local space-time attention map as features.

    z = Linear(x), split into heads; for every patch (t, i) and every offset o of a k x k window,
    a(t, i, o) = softmax_o(z_t(i) . z_{t+1}(i + o) / sqrt(head_dim)) (zero keys outside the grid and after the last
    frame); the maps of all heads (heads * k * k numbers per patch) -> Linear -> dim. The same projection serves as
    query and key, so at initialisation the map already peaks where similar content moved to: the direction of
    motion is a feature from the first step. A localised form of EVL's q(t) . k(t-1) temporal cross-attention term
    (Lin et al., ECCV 2022, arXiv 2208.03550), computed on the side branch's own tokens.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        grid: tuple[int, int],
        window: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grid, self.heads, self.window = grid, heads, window
        self.proj = nn.Linear(dim, dim, **dd)
        self.out = nn.Linear(heads * window * window, dim, **dd)
        lecun_normal_(self.proj, self.out)

    def forward(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """x: (B*T, H*W, d) patch tokens -> (B*T, H*W, d)."""
        (H, W), k, r = self.grid, self.window, self.window // 2
        z = self.proj(x).unflatten(0, (-1, T)).unflatten(2, (H, W)).unflatten(-1, (self.heads, -1))  # (B,T,H,W,h,c)
        z = z * z.shape[-1] ** -0.25  # both sides scaled: dot products come out / sqrt(c)
        nxt = nn.functional.pad(z[:, 1:], (0, 0, 0, 0, r, r, r, r, 0, 1))  # next frame, zero-padded (B,T,H+2r,W+2r,h,c)
        scores = torch.stack(
            [(z * nxt[:, :, dy : dy + H, dx : dx + W]).sum(-1) for dy in range(k) for dx in range(k)], dim=-1
        )  # (B, T, H, W, h, k*k)
        return self.out(scores.softmax(-1).flatten(-2)).flatten(2, 3).flatten(0, 1)
