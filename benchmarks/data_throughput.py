"""Data pipeline throughput: clips/s of `build_train_loader` for 8x224 clips from 320p H.264 shards and JPEG frames.

Generates synthetic 320p (568x320, 25 fps) H.264 videos with moving objects over textured, noisy backgrounds, packs
them three times (original bytes; `--reencode` to a 256 px short side with short GOPs; every frame extracted to a
folder of JPEGs (quality 90, full 568x320), packed as frame sequences like Something-Something-v1), then times the
training loader (dense sampler, 8 frames, stride 4, 224 px RandomResizedCrop) with 0, 1 and 2 DataLoader workers.

    python benchmarks/data_throughput.py --out runs/bench/data_throughput.json
    python benchmarks/data_throughput.py --quick          # a smoke check in well under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from i2v.config import DataCfg
from i2v.data.pack import pack
from i2v.data.synth import CLASSES, render_clip
from i2v.data.transforms import CLIP_MEAN, CLIP_STD, normalize
from i2v.data.video import encode_video
from i2v.data.wds import build_train_loader


def make_videos(root: Path, clips: int, frames: int, seed: int) -> list[tuple[str, str]]:
    """320p H.264 mp4 files (crf 23, x264 defaults otherwise: 250-frame GOP, B-frames), like a typical K400 copy."""
    items = []
    for i in range(clips):
        name = CLASSES[i % len(CLASSES)]
        path = root / f"{i:04d}_{name}.mp4"
        if not path.exists():
            clip = render_clip(name, np.random.default_rng([seed, i]), frames=frames, height=320, width=568)
            path.write_bytes(encode_video(clip, 25, options={"crf": "23", "preset": "veryfast"}))
        items.append((str(path), name))
    return items


def extract_frames(items: list[tuple[str, str]], root: Path) -> list[tuple[str, str]]:
    """Every frame of each video as root/<video stem>/00001.jpg ... (JPEG quality 90): frame-folder datasets."""
    out = []
    for path, label in items:
        folder = root / Path(path).stem
        if not folder.is_dir():
            tmp = folder.with_name(folder.name + ".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            with av.open(path) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    frame.to_image().save(tmp / f"{i + 1:05d}.jpg", quality=90)
            tmp.rename(folder)
        out.append((str(folder), label))
    return out


def time_loader(pattern: str, workers: int, batch_size: int, batches: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = DataCfg(
        train_shards=pattern,
        frames=8,
        sampler="dense",
        stride=4,
        size=224,
        batch_size=batch_size,
        num_workers=workers,
        epoch_clips=(batches + 1) * batch_size,
        shuffle_buffer=16,
    )
    loader = build_train_loader(cfg, seed=0)
    it = iter(loader)
    video, _ = next(it)  # warm-up: worker start, first shard open
    start = time.perf_counter()
    n = 0
    for video, label in it:  # uint8 from the workers; normalised here, as the training loop does on its device
        normalize(video.to(device, non_blocking=True), CLIP_MEAN, CLIP_STD)
        n += len(label)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "workers": workers,
        "clips": n,
        "seconds": round(seconds, 3),
        "clips_per_s": round(n / seconds, 2),
        "batch_shape": list(video.shape),
        "batch_mb": round(video.numel() * video.element_size() / 2**20, 2),  # uint8 bytes per host-to-device copy
        "device": str(device),
        "skipped": loader.skipped.count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/data_throughput.json"))
    parser.add_argument("--data", type=Path, help="keep generated videos and shards here (default: a temp dir)")
    parser.add_argument("--clips", type=int, default=24, help="videos to generate")
    parser.add_argument("--frames", type=int, default=100, help="frames per video (25 fps)")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per setting")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke check")
    args = parser.parse_args()
    if args.quick:
        args.clips, args.frames, args.batches, args.batch_size = 6, 40, 2, 4

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp)
        (root / "videos").mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        items = make_videos(root / "videos", args.clips, args.frames, args.seed)
        t1 = time.perf_counter()
        shards = {
            "original": pack(items, root / "original", shard_samples=8, progress=False),
            "reencoded": pack(
                items,
                root / "reencoded",
                shard_samples=8,
                progress=False,
                reencode_to={"short_side": 256, "fps": 0, "gop": 16},
            ),
            "frames": pack(
                extract_frames(items, root / "frames_src"), root / "frames", shard_samples=8, progress=False
            ),
        }
        t2 = time.perf_counter()
        sizes = {k: sum(p.stat().st_size for p in (root / k).glob("*.tar")) for k in shards}
        results = []
        for kind, pattern in shards.items():
            for workers in (int(w) for w in args.workers.split(",")):
                r = {"shards": kind, **time_loader(pattern, workers, args.batch_size, args.batches)}
                print(
                    f"{kind:10s} workers={workers}: {r['clips_per_s']:7.2f} clips/s  ({r['clips']} clips, "
                    f"{r['seconds']} s, batch {r['batch_shape']})"
                )
                results.append(r)

    report = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()},
        "setup": {
            "clips": args.clips,
            "frames_per_video": args.frames,
            "video": "568x320 H.264 crf23 25fps",
            "reencoded": "256 px short side, GOP 16, x264 tune=fastdecode",
            "frames": "every frame as a 568x320 JPEG (quality 90), packed as a frame sequence",
            "clip": "8 frames, stride 4, 224 px",
            "batch_size": args.batch_size,
            "timed_batches": args.batches,
            "quick": args.quick,
        },
        "generate_s": round(t1 - t0, 2),
        "pack_s": round(t2 - t1, 2),
        "shard_mb": {k: round(v / 1e6, 2) for k, v in sizes.items()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"generate {report['generate_s']} s, pack {report['pack_s']} s, shards {report['shard_mb']} MB -> {args.out}")


if __name__ == "__main__":
    main()
