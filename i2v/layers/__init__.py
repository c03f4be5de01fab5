"""Small reusable modules shared by the methods."""

from i2v.layers.adapters import LinearAdapter, STAdapter
from i2v.layers.heads import FrameProjection, linear_head
from i2v.layers.recompute import recomputed_linear
from i2v.layers.spacetime import ConvGLU3d, LocalCorrelation
from i2v.layers.temporal import from_video_grid, temporal_shift, to_video_grid

__all__ = [
    "ConvGLU3d",
    "FrameProjection",
    "LocalCorrelation",
    "LinearAdapter",
    "STAdapter",
    "linear_head",
    "recomputed_linear",
    "temporal_shift",
    "to_video_grid",
    "from_video_grid",
]
