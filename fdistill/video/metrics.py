"""Video metrics that are exact on the bouncing-square data (numpy; clips ``[B, T, H, W, C]``).

- Motion: the square's centre recovered by intensity-centroid tracking (exact on real clips,
  whose frames are box-filter coverages), mean speed |c_{t+1} - c_t| in pixels per frame, and a
  dynamic degree (fraction of clips whose mean speed exceeds a threshold: the analogue of
  VBench's optical-flow dynamic degree used by HiAR); frame-difference energy
  E[(x_{t+1} - x_t)^2].
- Quality: per-frame shape error, the mean squared distance of a frame to the ideal frame
  rendered with one square at its own centroid (0 on real clips).
- Temporal drift: the least-squares slope of the per-segment shape error against the segment
  index over a long rollout (e.g. 4x the training length); > 0 means quality decays.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from fdistill.data.video import render_squares


def _weights(x):
    """Object intensity in [0, 1] per pixel (background -1 -> 0), channel-averaged."""
    return np.clip((np.asarray(x, np.float64).mean(axis=-1) + 1.0) / 2.0, 0.0, 1.0)


def centroids(x) -> np.ndarray:
    """Intensity centroids ``[B, T, 2]`` (row, col) in pixels; the canvas centre if empty."""
    w = _weights(x)
    size = w.shape[-1]
    coords = np.arange(size) + 0.5
    mass = w.sum(axis=(-1, -2))
    safe = np.maximum(mass, 1e-12)
    rows = (w.sum(axis=-1) * coords).sum(axis=-1) / safe
    cols = (w.sum(axis=-2) * coords).sum(axis=-1) / safe
    c = np.stack([rows, cols], axis=-1)
    return np.where(mass[..., None] > 1e-12, c, size / 2.0)


def clip_speeds(x) -> np.ndarray:
    """Mean centroid speed of each clip ``[B]`` (pixels per frame)."""
    c = centroids(x)
    return np.linalg.norm(np.diff(c, axis=1), axis=-1).mean(axis=1)


def frame_difference_energy(x) -> float:
    """E[(x_{t+1} - x_t)^2] over clips, frames and pixels."""
    return float(np.mean(np.diff(np.asarray(x, np.float64), axis=1) ** 2))


def dynamic_degree(x, threshold: float = 0.25) -> float:
    """Fraction of clips whose mean speed exceeds ``threshold`` pixels per frame."""
    return float(np.mean(clip_speeds(x) > threshold))


def shape_error(x, *, square: float = 4.0) -> np.ndarray:
    """``[B, T]`` mean squared distance of each frame to one square rendered at its centroid."""
    x = np.asarray(x, np.float64)
    ideal = render_squares(centroids(x), size=x.shape[-2], square=square,
                           channels=x.shape[-1])
    return np.mean((x - ideal) ** 2, axis=(-1, -2, -3))


def motion_stats(x, *, square: float = 4.0, threshold: float = 0.25) -> dict[str, float]:
    """Mean speed, dynamic degree, frame-difference energy and shape error of clips."""
    return {"speed": float(clip_speeds(x).mean()),
            "dynamic": dynamic_degree(x, threshold),
            "frame_diff": frame_difference_energy(x),
            "shape_error": float(shape_error(x, square=square).mean())}


def drift(x, segment: int, *, square: float = 4.0) -> dict:
    """Temporal drift of a long rollout ``x [B, T_long, ...]``: per-segment shape error and the
    least-squares slope of it against the segment index (error units per segment)."""
    t = x.shape[1]
    if t % segment or t // segment < 2:
        raise ValueError(f"rollout of {t} frames must hold at least two whole segments of "
                         f"{segment} frames.")
    err = shape_error(x, square=square).reshape(x.shape[0], t // segment, segment).mean(axis=(0, 2))
    idx = np.arange(len(err), dtype=np.float64)
    slope = float(np.polyfit(idx, err, 1)[0])
    return {"slope": slope, "per_segment": err.tolist(),
            "speed_per_segment": clip_speeds_by_segment(x, segment).tolist()}


def clip_speeds_by_segment(x, segment: int) -> np.ndarray:
    """Mean centroid speed inside each segment of a long rollout."""
    c = centroids(x)
    v = np.linalg.norm(np.diff(c, axis=1), axis=-1)                    # [B, T - 1]
    v = np.concatenate([v, v[:, -1:]], axis=1)
    return v.reshape(x.shape[0], -1, segment).mean(axis=(0, 2))


def save_gif(path: str, clips, *, scale: int = 4, duration_ms: int = 150,
             max_clips: int = 16) -> str:
    """Writes clips ``[N, T, H, W, C]`` in [-1, 1] side by side as an animated GIF."""
    clips = np.asarray(clips)[:max_clips]
    n, t, h, w, _ = clips.shape
    frames = np.clip(np.round((clips.mean(-1) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    gap = 1
    canvas = np.full((t, h, n * (w + gap) - gap), 255, np.uint8)
    for i in range(n):
        canvas[:, :, i * (w + gap):i * (w + gap) + w] = frames[i]
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale),
                                        Image.NEAREST) for f in canvas]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return path
