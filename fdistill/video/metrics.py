"""Video metrics that are exact on the bouncing-square data (numpy; clips ``[B, T, H, W, C]``).

Tracking. ``centroids`` finds the square in each frame as the ``ceil(square)``-wide window of
largest object intensity (background -1 -> 0, square 1 -> 1) and takes the intensity centroid
inside that window grown by one pixel on each side. A box-filter-rendered square always lies
inside it, so tracking is exact on real clips; unlike a whole-frame centroid it ignores faint
background noise (a whole-frame centroid is pulled towards the canvas centre by it) and follows
the brightest blob of a fragmented frame instead of averaging the fragments.

Motion, as HiAR measures it (VBench's dynamic degree on long rollouts), made exact here:

- ``pair_displacements``: |c_{t+1} - c_t| per frame pair (pixels per frame), the analogue of
  the optical-flow magnitude of a pair;
- ``dynamic_degree``: VBench's rule, a clip is dynamic when at least a quarter of its frame
  pairs exceed a displacement threshold; ``dynamic_threshold`` takes the threshold from the
  data's own distribution (its lower quartile of pair displacements), so real clips score about
  0.75, faster ones up to 1 and slower ones down to 0 (half-speed data about 0);
- speed ratio: mean pair displacement against the data's, per segment of a long rollout.

Quality per frame, and drift over a long rollout:

- ``shape_error``: mean squared distance of a frame to one square rendered at its tracked
  centre (0 on real clips);
- ``sharpness``: mean squared spatial finite difference (edge energy);
- ``intensity``: mean brightness above the background, mean((x + 1) / 2) (the square's area
  fraction on real clips, square^2 / size^2);
- drift of a measure: the least-squares slope of its per-segment mean against the segment
  index, its fitted change over the rollout (slope x (segments - 1)) and that change relative
  to the data's value of the measure (shape error: relative to a blank frame's error on data).

``evaluate_rollout`` bundles all of it for rollouts at least 4x the training length.
"""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

from fdistill import monitor
from fdistill.data.video import render_squares

QUALITY_MEASURES = ("shape_error", "sharpness", "intensity")
MIN_ROLLOUT_FACTOR = 4


def _weights(x):
    """Object intensity in [0, 1] per pixel (background -1 -> 0), channel-averaged."""
    return np.clip((np.asarray(x, np.float64).mean(axis=-1) + 1.0) / 2.0, 0.0, 1.0)


def _window_sums(w, k):
    """Sums of ``w [N, H, W]`` over every k x k window, ``[N, H - k + 1, W - k + 1]``."""
    c = np.pad(np.cumsum(np.cumsum(w, axis=1), axis=2), ((0, 0), (1, 0), (1, 0)))
    return c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]


def centroids(x, *, square: float = 4.0) -> np.ndarray:
    """Tracked square centres ``[B, T, 2]`` (row, col) in pixels; the canvas centre if a frame
    holds no object intensity (see the module docstring for the rule)."""
    w = _weights(x)
    lead, (h, wd) = w.shape[:-2], w.shape[-2:]
    w = w.reshape(-1, h, wd)
    k = min(int(math.ceil(square)), h, wd)
    sums = _window_sums(w, k)
    best = sums.reshape(len(w), -1).argmax(axis=1)
    top, left = np.divmod(best, sums.shape[2])
    # the window grown by one pixel per side, cut from the frame padded by one zero pixel
    span = np.arange(k + 2)
    rows, cols = top[:, None] + span, left[:, None] + span             # padded coordinates
    crop = np.pad(w, ((0, 0), (1, 1), (1, 1)))[np.arange(len(w))[:, None, None],
                                               rows[:, :, None], cols[:, None, :]]
    mass = crop.sum(axis=(1, 2))
    safe = np.maximum(mass, 1e-12)
    c = np.stack([(crop.sum(axis=2) * (rows - 0.5)).sum(axis=1) / safe,
                  (crop.sum(axis=1) * (cols - 0.5)).sum(axis=1) / safe], axis=-1)
    c = np.where(mass[:, None] > 1e-12, c, np.array([h / 2.0, wd / 2.0]))
    return c.reshape(*lead, 2)


def pair_displacements(x, *, square: float = 4.0) -> np.ndarray:
    """|c_{t+1} - c_t| of the tracked centres, ``[B, T - 1]`` (pixels per frame)."""
    return np.linalg.norm(np.diff(centroids(x, square=square), axis=1), axis=-1)


def clip_speeds(x, *, square: float = 4.0) -> np.ndarray:
    """Mean tracked speed of each clip ``[B]`` (pixels per frame)."""
    return pair_displacements(x, square=square).mean(axis=1)


def frame_difference_energy(x) -> float:
    """E[(x_{t+1} - x_t)^2] over clips, frames and pixels."""
    return float(np.mean(np.diff(np.asarray(x, np.float64), axis=1) ** 2))


def dynamic_threshold(data_clips, *, quantile: float = 0.25, square: float = 4.0) -> float:
    """The displacement threshold of ``dynamic_degree`` from the data: the ``quantile`` of its
    pair displacements (pixels per frame)."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must lie in (0, 1); got {quantile}.")
    return float(np.quantile(pair_displacements(data_clips, square=square), quantile))


def dynamic_flags(x, threshold: float, *, min_fraction: float = 0.25,
                  square: float = 4.0) -> np.ndarray:
    """VBench's rule per clip ``[B]`` bool: at least ``max(1, round(min_fraction x pairs))``
    frame pairs move more than ``threshold`` pixels (VBench: 4 of every 16 frames)."""
    d = pair_displacements(x, square=square)
    need = max(1, int(round(min_fraction * d.shape[1])))
    return (d > threshold).sum(axis=1) >= need


def dynamic_degree(x, threshold: float, *, min_fraction: float = 0.25,
                   square: float = 4.0) -> float:
    """Fraction of dynamic clips (``dynamic_flags``); take ``threshold`` from
    ``dynamic_threshold(data)`` so that the score does not saturate on real motion."""
    return float(np.mean(dynamic_flags(x, threshold, min_fraction=min_fraction,
                                       square=square)))


def shape_error(x, *, square: float = 4.0) -> np.ndarray:
    """``[B, T]`` mean squared distance of each frame to one square rendered at its tracked
    centre."""
    x = np.asarray(x, np.float64)
    ideal = render_squares(centroids(x, square=square), size=x.shape[-2], square=square,
                           channels=x.shape[-1])
    return np.mean((x - ideal) ** 2, axis=(-1, -2, -3))


def sharpness(x) -> np.ndarray:
    """``[B, T]`` mean squared spatial finite difference of each frame (edge energy)."""
    x = np.asarray(x, np.float64)
    return (np.mean(np.diff(x, axis=2) ** 2, axis=(2, 3, 4))
            + np.mean(np.diff(x, axis=3) ** 2, axis=(2, 3, 4)))


def intensity(x) -> np.ndarray:
    """``[B, T]`` mean brightness above the background, mean((x + 1) / 2) over the frame."""
    return np.mean((np.asarray(x, np.float64) + 1.0) / 2.0, axis=(2, 3, 4))


def quality(x, *, square: float = 4.0) -> dict[str, np.ndarray]:
    """Every quality measure per frame: ``{name: [B, T]}`` for ``QUALITY_MEASURES``."""
    return {"shape_error": shape_error(x, square=square), "sharpness": sharpness(x),
            "intensity": intensity(x)}


def motion_stats(x, *, square: float = 4.0, threshold: float = 0.25) -> dict[str, float]:
    """Mean speed, dynamic degree at ``threshold``, frame-difference energy and shape error."""
    return {"speed": float(clip_speeds(x, square=square).mean()),
            "dynamic": dynamic_degree(x, threshold, square=square),
            "frame_diff": frame_difference_energy(x),
            "shape_error": float(shape_error(x, square=square).mean())}


def _check_segments(t: int, segment: int, min_segments: int = 2) -> int:
    if segment < 2:
        raise ValueError(f"segments need at least 2 frames to hold a frame pair; got "
                         f"{segment}.")
    if t % segment or t // segment < min_segments:
        least = {1: "one whole segment", 2: "two whole segments"}[min_segments]
        raise ValueError(f"rollout of {t} frames must hold at least {least} of {segment} frames "
                         f"and no partial segment.")
    return t // segment


def segment_means(values, segment: int) -> np.ndarray:
    """Per-frame values ``[B, T]`` -> their mean over clips and frames of each segment."""
    values = np.asarray(values, np.float64)
    b, t = values.shape
    return values.reshape(b, t // segment, segment).mean(axis=(0, 2))


def segment_speeds(x, segment: int, *, square: float = 4.0) -> np.ndarray:
    """Mean pair displacement inside each segment (the segment - 1 pairs within it)."""
    n = _check_segments(x.shape[1], segment, min_segments=1)
    c = centroids(x, square=square)
    c = c.reshape(c.shape[0], n, segment, 2)
    return np.linalg.norm(np.diff(c, axis=2), axis=-1).mean(axis=(0, 2))


def trend(per_segment) -> dict[str, float]:
    """Least-squares line through ``per_segment`` against the segment index: its slope (units
    per segment) and fitted change from the first to the last segment."""
    y = np.asarray(per_segment, np.float64)
    slope = float(np.polyfit(np.arange(len(y), dtype=np.float64), y, 1)[0])
    return {"slope": slope, "change": slope * (len(y) - 1)}


def drift(x, segment: int, *, square: float = 4.0) -> dict:
    """Temporal drift of a long rollout ``x [B, T_long, ...]``: the shape error's per-segment
    means and their slope (``'slope'``), every quality measure's trend and the speed per
    segment."""
    _check_segments(x.shape[1], segment)
    per = {k: segment_means(v, segment) for k, v in quality(x, square=square).items()}
    out = {"slope": trend(per["shape_error"])["slope"],
           "per_segment": per["shape_error"].tolist(),
           "speed_per_segment": segment_speeds(x, segment, square=square).tolist()}
    for k, v in per.items():
        out[f"{k}/slope"] = trend(v)["slope"]
        out[f"{k}/per_segment"] = v.tolist()
    return out


def evaluate_rollout(long_clips, data_clips, train_length: int, *, square: float = 4.0,
                     quantile: float = 0.25, min_fraction: float = 0.25) -> dict:
    """Motion and drift of a long rollout against data clips, as HiAR measures them.

    ``long_clips [B, T_long, ...]`` with T_long a multiple of ``train_length`` and at least
    ``MIN_ROLLOUT_FACTOR`` (4) times it; ``data_clips [B', train_length, ...]``. Each segment of
    ``train_length`` frames is scored like a data clip. Returns a flat dict of floats and
    per-segment lists:

    - ``threshold``: the data's ``quantile`` of pair displacements; ``data/speed``,
      ``data/dynamic`` and ``data/<measure>``: the data's own values;
    - ``speed``, ``speed_ratio`` (to ``data/speed``), ``speed_ratio_per_segment``;
    - ``dynamic`` (mean over segments), ``dynamic_per_segment``;
    - ``<measure>`` and ``<measure>_per_segment`` for shape_error, sharpness, intensity;
    - ``drift/<measure>/slope`` (per segment), ``drift/<measure>/change`` (over the rollout),
      ``drift/<measure>/relative`` (change over the data's value; shape error over a blank
      frame's error on the data); ``drift``: the mean |relative change| of the three.
    """
    long_clips, data_clips = np.asarray(long_clips), np.asarray(data_clips)
    if data_clips.shape[1] != train_length:
        raise ValueError(f"data clips must have the training length {train_length} (each "
                         f"rollout segment is scored like one); got {data_clips.shape[1]} "
                         f"frames.")
    if long_clips.shape[2:] != data_clips.shape[2:]:
        raise ValueError(f"rollout frames {long_clips.shape[2:]} and data frames "
                         f"{data_clips.shape[2:]} differ.")
    t = long_clips.shape[1]
    if t < MIN_ROLLOUT_FACTOR * train_length:
        raise ValueError(f"a rollout of {t} frames is shorter than {MIN_ROLLOUT_FACTOR}x the "
                         f"training length {train_length}; roll out at least "
                         f"{MIN_ROLLOUT_FACTOR * train_length} frames.")
    n = _check_segments(t, train_length)
    b = long_clips.shape[0]
    segments = long_clips.reshape(b * n, train_length, *long_clips.shape[2:])

    threshold = dynamic_threshold(data_clips, quantile=quantile, square=square)
    data_speed = float(clip_speeds(data_clips, square=square).mean())
    out = {"threshold": threshold, "data/speed": data_speed,
           "data/dynamic": dynamic_degree(data_clips, threshold, min_fraction=min_fraction,
                                          square=square)}
    speeds = segment_speeds(long_clips, train_length, square=square)
    out["speed"] = float(speeds.mean())
    out["speed_ratio"] = out["speed"] / data_speed
    out["speed_ratio_per_segment"] = (speeds / data_speed).tolist()
    flags = dynamic_flags(segments, threshold, min_fraction=min_fraction, square=square)
    per_segment = flags.reshape(b, n).mean(axis=0)
    out["dynamic"] = float(per_segment.mean())
    out["dynamic_per_segment"] = per_segment.tolist()

    data_quality = {k: float(v.mean()) for k, v in quality(data_clips, square=square).items()}
    scale = dict(data_quality,
                 shape_error=float(np.mean((np.asarray(data_clips, np.float64) + 1.0) ** 2)))
    relative = []
    for name, values in quality(long_clips, square=square).items():
        per = segment_means(values, train_length)
        line = trend(per)
        out[f"data/{name}"] = data_quality[name]
        out[name] = float(per.mean())
        out[f"{name}_per_segment"] = per.tolist()
        out[f"drift/{name}/slope"] = line["slope"]
        out[f"drift/{name}/change"] = line["change"]
        out[f"drift/{name}/relative"] = line["change"] / scale[name]
        relative.append(abs(out[f"drift/{name}/relative"]))
    out["drift"] = float(np.mean(relative))
    return out


def save_gif(path: str, clips, *, scale: int = 4, duration_ms: int = 150,
             max_clips: int = 16, title: str | None = None) -> str:
    """Writes clips ``[N, T, H, W, C]`` in [-1, 1] side by side as an animated GIF; with
    ``title`` (at most three lines), every frame carries it in a white band above the clips."""
    clips = np.asarray(clips)[:max_clips]
    n, t, h, w, _ = clips.shape
    frames = np.clip(np.round((clips.mean(-1) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    gap = 1
    canvas = np.full((t, h, n * (w + gap) - gap), 255, np.uint8)
    for i in range(n):
        canvas[:, :, i * (w + gap):i * (w + gap) + w] = frames[i]
    frames = [monitor.enlarge(f, scale) for f in canvas]
    if title is not None:
        frames = [monitor.panel_row([f], titles=[title]) for f in frames]
    images = [Image.fromarray(f) for f in frames]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return path
