"""Behaviour of every registered method on a tiny backbone (timm tests/test_models.py style)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_METHOD, tiny_cfg
from open_clip.transformer import ResidualAttentionBlock

from i2v import bench
from i2v.config import ConfigError, load_config
from i2v.data.synth import render_clip
from i2v.describe import count_flops, describe
from i2v.layers import LinearAdapter, recomputed_linear, temporal_shift
from i2v.methods import METHODS, create_model, list_methods

ALL = list_methods()
FROZEN_BACKBONE = [m for m in ALL if m != "full_finetune"]


def video(B=2, T=4):
    return torch.randn(B, T, 3, 32, 32)


def test_registry_and_test_table_cover_the_same_methods():
    assert (
        ALL
        == sorted(TINY_METHOD)
        == ["full_finetune", "linear_probe", "m_adapter", "side4video", "st_adapter", "zeroi2v"]
    )


@pytest.mark.parametrize("name", ALL)
def test_forward_backward(name):
    model = create_model(tiny_cfg(name)).train()
    logits = model(video())
    assert logits.shape == (2, 5)
    logits.logsumexp(-1).sum().backward()
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and [n for n, p in trainable.items() if p.grad is None] == []
    # Zero-initialised outputs (adapter convs, gates) block the gradient of what feeds them at step 0; once they
    # are non-zero, every trainable parameter must be connected to the loss.
    _perturb(model)
    model.zero_grad()
    model(video()).logsumexp(-1).sum().backward()
    assert [n for n, p in trainable.items() if not p.grad.abs().sum() > 0] == []
    # grads laid out like their params, or DDP warns "grad strides do not match bucket view"
    assert [n for n, p in trainable.items() if p.grad.stride() != p.stride()] == []
    if name in FROZEN_BACKBONE:
        # ZeroI2V trains the tower's own ln_post, as the reference does; nothing else of the backbone trains.
        allowed = {"backbone.visual.ln_post.weight", "backbone.visual.ln_post.bias"} if name == "zeroi2v" else set()
        assert {n for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad} == allowed
        assert all(
            p.grad is None for n, p in model.named_parameters() if n.startswith("backbone.") and n not in allowed
        )


@pytest.mark.parametrize("name", [m for m in ALL if METHODS[m].backbone_no_grad])
def test_side_networks_keep_no_backbone_graph(name):
    model = create_model(tiny_cfg(name)).train()
    outputs = []
    model.backbone.register_forward_hook(
        lambda m, a, o: outputs.extend([*o[0], *o[1]] if isinstance(o, tuple) else [o])
    )
    model.backbone.visual.register_forward_hook(lambda m, a, o: outputs.append(o))  # pooled embeddings
    model(video()).sum().backward()
    assert outputs and all(t.grad_fn is None and not t.requires_grad for t in outputs)


@pytest.mark.parametrize("name", ALL)
def test_trainable_state_dict_round_trips(name, tmp_path):
    model = create_model(tiny_cfg(name)).eval()
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sd = model.trainable_state_dict()
    assert name in ("full_finetune", "zeroi2v") or not any(k.startswith("backbone.") for k in sd)
    torch.save(sd, tmp_path / "t.pt")
    other = create_model(tiny_cfg(name)).eval()
    other.backbone.load_state_dict(model.backbone.state_dict())  # same frozen weights, as from a pretrained file
    other.load_trainable_state_dict(torch.load(tmp_path / "t.pt"))
    x = video()
    torch.testing.assert_close(other(x), model(x))
    with pytest.raises(KeyError, match="missing"):
        other.load_trainable_state_dict({})


@pytest.mark.parametrize("name", [m for m in ALL if m != "zeroi2v"])
def test_merge_is_identity_elsewhere(name):
    model = create_model(tiny_cfg(name)).eval()
    x = video()
    before = model(x)
    assert model.merge() is model
    torch.testing.assert_close(model(x), before)


def _perturb(model):
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_zeroi2v_merge_folds_adapters_exactly(scale):
    model = create_model(tiny_cfg("zeroi2v", f"method.adapter_scale={scale}")).eval()
    plain_params = sum(p.numel() for p in model.backbone.parameters())  # the image tower's own count
    _perturb(model)  # non-trivial adapters, temporal embedding and head
    x = video()
    before = model(x)
    merged = model.merge()
    assert not any(isinstance(m, LinearAdapter) for m in merged.modules())
    assert all(type(b) is ResidualAttentionBlock for b in merged.backbone.blocks)
    assert sum(p.numel() for p in merged.backbone.parameters()) == plain_params
    assert (merged(x) - before).abs().max() <= 1e-4


def test_stdha_adds_no_parameters():
    with_stdha = create_model(tiny_cfg("zeroi2v", "method.stdha_offsets=[-1,1,-2,2]"))
    without = create_model(tiny_cfg("zeroi2v", "method.stdha_offsets=[]"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(with_stdha) == count(without)


def test_temporal_shift_takes_each_head_from_its_frame():
    T, hd = 4, 2
    x = torch.arange(T, dtype=torch.float)[:, None, None].expand(T, 1, 3 * hd).clone()  # value = frame index
    out = temporal_shift(x, T, [-1, 1], hd).squeeze(1)  # (T, 3*hd)
    assert out[:, 0].tolist() == [0, 0, 1, 2]  # head 0 <- t-1 (first frame keeps its own)
    assert out[:, hd].tolist() == [1, 2, 3, 3]  # head 1 <- t+1 (last frame keeps its own)
    assert out[:, 2 * hd].tolist() == [0, 1, 2, 3]  # head 2 spatial


def _image_model_logits(model, x):
    """The frozen image model, frame by frame, with the method's own head (the paper's starting point)."""
    _, prefix = model.backbone(x, [-1])
    cls = prefix[-1][:, :, 0]  # (B, T, D)
    if model.cfg.name == "st_adapter":
        return model.head(model.backbone.visual.ln_post(cls.mean(1)))
    return model.head(model.backbone.visual.ln_post(cls).mean(1))


@pytest.mark.parametrize("position", ["pre_attn", "pre_mlp", "both"])
def test_st_adapter_starts_as_the_image_model(position):
    model = create_model(tiny_cfg("st_adapter", f"method.position={position}")).eval()
    x = video()
    torch.testing.assert_close(model(x), _image_model_logits(model, x))


def test_zeroi2v_starts_as_the_image_model():
    # Zero-initialised adapters and temporal embedding are the identity. STDHA itself has no parameters to zero, so
    # it changes attention on moving videos; without temporal heads, or on a static clip, the image model is exact.
    no_shift = create_model(tiny_cfg("zeroi2v", "method.stdha_offsets=[]")).eval()
    x = video()
    torch.testing.assert_close(no_shift(x), _image_model_logits(no_shift, x))
    model = create_model(tiny_cfg("zeroi2v")).eval()
    static = video(T=1).expand(2, 4, 3, 32, 32)
    torch.testing.assert_close(model(static), _image_model_logits(model, static))
    assert not torch.allclose(model(x), _image_model_logits(model, x))  # STDHA is live


def test_in_block_methods_refuse_timm_towers():
    from conftest import TINY_EVA

    with pytest.raises(NotImplementedError, match="side-network methods"):
        create_model(load_config(None, [f"backbone.name={TINY_EVA}", "method.name=st_adapter"]))


@pytest.mark.parametrize(
    "name, overrides, needle",
    [
        ("side4video", ["method.side_width=40"], "side_width: 40 must be a multiple of method.side_head_dim=16"),
        ("side4video", ["method.kernel_t=5"], "data.frames: 4 is shorter than method.kernel_t=5"),
        ("m_adapter", ["method.num_heads=3"], "method.width: 32 must be divisible by method.num_heads=3"),
        ("zeroi2v", ["method.stdha_offsets=[1,1,1,1,1]"], "5 offsets for a 4-head backbone"),
        ("zeroi2v", ["method.stdha_offsets=[-4]"], "must be smaller than frames=4"),
        ("st_adapter", ["method.adapter_layers=9"], "adapter_layers: 9 must be in [1, 4]"),
    ],
)
def test_bad_method_settings_name_the_field(name, overrides, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        create_model(tiny_cfg(name, *overrides))


# Reference trainable-parameter counts (ViT-B-16, 8 frames, K=400; shared/METHODS.md §5).
REFERENCE = [
    ("st_adapter", [], 7_417_744),
    ("st_adapter", ["method.position=both"], 14_527_888),
    ("side4video", [], 21_185_232),
    ("side4video", ["method.side_width=128"], 4_356_624),
    ("zeroi2v", [], 14_517_136),
]


@pytest.mark.parametrize("name, overrides, expected", REFERENCE)
def test_vit_b16_trainable_counts_match_the_reference_code(name, overrides, expected):
    cfg = load_config(None, [f"method.name={name}", "backbone.name=ViT-B-16", *overrides])
    assert describe(cfg)["trainable_params"] == expected


def test_zeroi2v_merged_costs_what_the_image_model_costs():
    cfg = load_config(None, ["method.name=zeroi2v", "backbone.name=ViT-B-16"])
    zero = describe(cfg)
    backbone = create_model(cfg, device="meta").backbone
    image_model = count_flops(backbone, torch.empty(1, 8, 3, 224, 224, device="meta"))  # 12 blocks x 8 frames
    assert zero["gflops"] * 1e9 == pytest.approx(image_model + 2 * 768 * 400, rel=1e-9)  # + the linear head
    assert zero["gflops_unmerged"] > zero["gflops"]
    assert zero["inference_params"] < zero["total_params"]


def test_config_errors_surface_before_building():
    with pytest.raises(ConfigError):
        tiny_cfg("st_adapter", "method.bottleneck=1.5")


@pytest.mark.parametrize("name", ["st_adapter", "zeroi2v", "side4video", "full_finetune"])
def test_grad_checkpointing_gives_identical_gradients(name):
    model = create_model(tiny_cfg(name)).train()
    _perturb(model)
    for m in model.modules():  # dropout masks would differ between the two passes
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = video()
    calls = [0]
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    grads, counts = [], []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        calls[0] = 0
        torch.manual_seed(1)
        model(x).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        counts.append(calls[0])
    assert counts[1] > counts[0]  # activations really were recomputed in backward
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_recomputed_linear_gives_autograd_gradients_and_keeps_only_its_input():
    g, beta = (torch.randn(8, requires_grad=True) for _ in range(2))
    weight = torch.randn(4, 8, 1, 1, 1).to(memory_format=torch.channels_last_3d).requires_grad_()  # a 1x1x1 conv
    bias = torch.randn(4, requires_grad=True)
    params = [g, beta, weight, bias]

    def fn(x, g, b):
        return F.gelu(F.layer_norm(x, (8,), g, b))

    for x_grad in (True, False):  # the frozen taps need no gradient
        x = torch.randn(6, 5, 8, requires_grad=x_grad)
        dy = torch.randn(6, 5, 4)
        F.linear(fn(x, g, beta), weight.flatten(1), bias).backward(dy)
        expected = [t.grad for t in (x, *params)]
        for t in (x, *params):
            t.grad = None
        with torch.no_grad():
            z = fn(x, g, beta)

        def step():
            y = recomputed_linear(fn, x, z, weight, bias, g, beta)  # noqa: B023
            y.backward(dy)  # noqa: B023

        assert bench.saved_bytes(step, params) == x.numel() * 4  # x alone: not fn(x), not the recomputation
        for got, want in zip([t.grad for t in (x, *params)], expected):
            assert got is want is None or torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        assert weight.grad.stride() == weight.stride()  # laid out like the weight (DDP buckets)
        for t in (x, *params):
            t.grad = None


@pytest.mark.parametrize("amp", [False, True])
def test_side4video_lean_activations_keep_less_and_change_nothing(amp):
    # i2v issue 14: by default training keeps each side-block branch's input and recomputes the norms, the depthwise
    # conv, GELU and the MLP's fc1 in backward. Same logits, gradients and BatchNorm statistics as plain autograd
    # (fp32), or up to bf16 rounding under autocast with a bf16 backbone (whose taps it then keeps in bf16).
    extra = ["backbone.precision=bf16"] if amp else []
    plain = create_model(tiny_cfg("side4video", "method.lean_activations=false", *extra)).train()
    _perturb(plain)
    lean = create_model(tiny_cfg("side4video", *extra)).train()
    lean.load_state_dict(plain.state_dict())
    x = video()
    runs = []
    for model in (plain, lean):
        out = {}

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out["logits"] = model(x)  # noqa: B023
            out["logits"].float().logsumexp(-1).sum().backward()  # noqa: B023

        out["saved"] = bench.saved_bytes(step, [*model.parameters(), *model.buffers()])
        out["grads"] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        out["buffers"] = dict(model.named_buffers())
        runs.append(out)
    before, after = runs
    assert after["saved"] < 0.6 * before["saved"]
    tol = dict(rtol=2e-2, atol=2e-2) if amp else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(after["logits"], before["logits"], **tol)
    for n, g in before["grads"].items():
        if amp:  # bf16 rounding: within 5% of each tensor's largest gradient (the patch-embedding conv's bias feeds a
            # BatchNorm, so its exact gradient is 0 and both paths give rounding noise of ~1e-9)
            assert (after["grads"][n] - g).abs().max() <= 0.05 * g.abs().max() + 1e-8, n
        else:
            torch.testing.assert_close(after["grads"][n], g, **tol, msg=n)
    for n, b in before["buffers"].items():  # BatchNorm statistics: updated once, from the same batch
        torch.testing.assert_close(after["buffers"][n], b, **(tol if amp else {}), msg=n)


# Methods that claim temporal modelling: settings that give them their temporal part (ZeroI2V: STDHA heads), and a
# learning rate (the in-block adapters' heads start 10x smaller, so they get a larger one).
TEMPORAL = {
    "side4video": ([], 1e-3),
    "st_adapter": ([], 5e-3),
    "zeroi2v": (["method.stdha_offsets=[-1,1]"], 5e-3),
    "m_adapter": ([], 1e-3),
}


def _moving_clips(n: int, T: int = 8, seed: int = 0) -> torch.Tensor:
    """(n, T, 3, 32, 32) clips of the synthetic benchmark's `move_right` class (a shape crossing a textured field)."""
    rng = np.random.default_rng(seed)
    clips = np.stack([render_clip("move_right", rng, frames=T, height=32, width=32) for _ in range(n)])
    return (torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float() / 255 - 0.45) / 0.27


def _randomise(model):
    """Gives the zero-initialised trainable tensors (adapter convs and up-projections, gates, embeddings) random
    values, so that every temporal path of the method is live, as after some training."""
    with torch.no_grad():
        for p in model.trainable_parameters():
            if not p.any():
                p.normal_(std=0.1)


@pytest.mark.parametrize("name", TEMPORAL)
def test_temporal_methods_tell_a_clip_from_its_time_reversal(name):
    # i2v issue 15: the first M-adapter reconstruction pooled a linear space-time filter over all positions, so its
    # features could not learn which way things move. The pair batch holds clips of objects moving right and the
    # same clips played backwards (moving left): only the order of frames tells the two labels apart.
    model = create_model(tiny_cfg(name, "method.head_dropout=0.0", *TEMPORAL[name][0], frames=8, num_classes=2))
    _randomise(model)
    x = _moving_clips(8)
    pair, labels = torch.cat([x, x.flip(1)]), torch.tensor([0] * 8 + [1] * 8)
    feats = []
    model.head.register_forward_pre_hook(lambda m, a: feats.append(a[0].detach()))
    with torch.no_grad():
        model.eval()(pair)
    forward, backward = feats[-1].chunk(2)
    assert (forward - backward).abs().amax(-1).min() > 1e-3 * forward.abs().amax()  # every clip differs reversed
    model.train()
    opt = torch.optim.Adam(model.trainable_parameters(), lr=TEMPORAL[name][1])
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(pair), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Clearly below chance (ln 2). The first M-adapter stayed at 0.686 here; the others end at 0.01-0.44.
    assert loss.item() < math.log(2) - 0.15


def test_m_adapter_every_level_learns_from_the_first_step():
    # A zero gate on a zero-initialised projection gives neither a gradient: deeper levels would never start.
    model = create_model(tiny_cfg("m_adapter", "method.indices=[0,1,2,3]")).train()
    model(video()).logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[1] for n in grads if n.startswith("levels.")} == {"0", "1", "2", "3"}
    # The pixel embedding's conv bias feeds a BatchNorm, which removes it: its exact gradient is 0 (as in Side4Video).
    bias = grads.pop("pixel_embed.bias")
    assert bias.abs().max() < 1e-5 * grads["pixel_embed.weight"].abs().max()
    assert [n for n, g in grads.items() if g is None or not g.abs().sum() > 0] == []


def test_m_adapter_pools_what_differs_between_clips():
    # Patch tokens are batch-normalised before the pooling: in training the pooled patch feature of each channel is
    # centred over the batch, so a component every clip shares (a static background) does not swamp the few tokens
    # of what moves. The LayerNorm of the first reconstructions normalised each token alone and kept that component
    # (8-class synthetic set: 0.137 with it, README).
    model = create_model(tiny_cfg("m_adapter", "method.head_dropout=0.0", frames=8, num_classes=2)).train()
    feats = []
    model.head.register_forward_pre_hook(lambda m, a: feats.append(a[0].detach()))
    x = _moving_clips(8)
    model(torch.cat([x, x.flip(1)]))
    patches = feats[0][:, model.head[-1].in_features // 2 :]  # (B, d): [class tokens ; patches]
    assert patches.mean(0).abs().max() < 1e-4 * patches.std(0).min()


@pytest.mark.parametrize("pixel_embed", [True, False])
def test_m_adapter_reads_the_clip_itself_besides_the_taps(pixel_embed):
    # The pixel level: with the frozen tower's outputs held fixed, the branch still sees the frames and their order
    # (the tower's tokens blur motion under a patch per frame; the first two reconstructions read only the taps).
    model = create_model(tiny_cfg("m_adapter", f"method.pixel_embed={pixel_embed}")).eval()
    assert any(n.startswith("pixel_") for n, _ in model.named_parameters()) == pixel_embed
    x = video()
    taps = model.backbone(x, model.indices)
    model.backbone.forward = lambda *args: taps
    with torch.no_grad():
        change = (model(x) - model(x.flip(1))).abs().max()
    assert change > 1e-4 if pixel_embed else change == 0
