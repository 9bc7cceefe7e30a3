"""Synthetic video with known motion: one square bouncing on a small canvas.

Each clip is a square of side ``square`` pixels moving at constant velocity inside a
``size x size`` canvas, reflecting off the walls. The speed (pixels per frame) is drawn
uniformly from ``[speed_min, speed_max]`` and the direction uniformly on the circle, so the true
motion statistics are known in closed form away from the walls and exactly, clip by clip, from
the generating trajectories (``ds.centres(step)``).

Frames are rendered by exact box-filter coverage: a pixel's intensity is the area of its overlap
with the square, mapped to [-1, 1] (background -1). The intensity centroid of a frame is then
exactly the square's centre, so motion recovered from frames by centroid tracking
(``fdistill.video.metrics``) is exact on real clips.

Batches are a pure function of ``(seed, step)`` (``numpy.random.default_rng([seed, step])``):
random access, deterministic, and each process takes its slice of the global batch.
Layout: ``x`` is ``[B, T, H, W, C]`` float32 in [-1, 1]; ``label`` is all zeros (unconditional).
"""
from __future__ import annotations

import numpy as np


class BouncingSquares:
    """Bouncing-square clips ``[T, size, size, channels]`` with random-access ``batch(step)``."""

    name = "video"
    num_classes = 0

    def __init__(self, *, num_frames: int = 8, size: int = 16, channels: int = 1,
                 square: float = 4.0, speed_min: float = 0.5, speed_max: float = 1.5,
                 global_batch_size: int, process_index: int = 0, process_count: int = 1,
                 seed: int = 0):
        if not 0 < square < size:
            raise ValueError(f"square side {square} must lie in (0, size={size}).")
        if not 0 <= speed_min <= speed_max:
            raise ValueError(f"need 0 <= speed_min <= speed_max; got {speed_min}, {speed_max}.")
        if num_frames < 2:
            raise ValueError(f"num_frames must be at least 2 to have motion; got {num_frames}.")
        if global_batch_size % process_count:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                             f"{process_count} processes.")
        self.num_frames, self.size, self.channels = num_frames, size, channels
        self.square, self.speed_min, self.speed_max = float(square), speed_min, speed_max
        self.global_batch_size = global_batch_size
        self.process_index, self.process_count = process_index, process_count
        self.seed = seed
        self.shape = (num_frames, size, size, channels)

    @property
    def mean_speed(self) -> float:
        """E|v| in pixels per frame (the centroid speed on frames not touching a wall)."""
        return 0.5 * (self.speed_min + self.speed_max)

    def _local_slice(self) -> slice:
        n = self.global_batch_size // self.process_count
        return slice(self.process_index * n, (self.process_index + 1) * n)

    def centres(self, step: int, *, num_frames: int | None = None) -> np.ndarray:
        """Square centres ``[B, T, 2]`` as (row, col) in pixels for this process' slice."""
        rng = np.random.default_rng([self.seed, step])
        n, t = self.global_batch_size, num_frames or self.num_frames
        free = self.size - self.square
        start = rng.uniform(0.0, free, size=(n, 2))
        speed = rng.uniform(self.speed_min, self.speed_max, size=(n, 1))
        angle = rng.uniform(0.0, 2 * np.pi, size=(n, 1))
        velocity = speed * np.concatenate([np.sin(angle), np.cos(angle)], axis=1)
        path = start[:, None, :] + velocity[:, None, :] * np.arange(t)[None, :, None]
        corner = free - np.abs(free - np.mod(path, 2 * free))   # reflection = triangle wave
        return (corner + 0.5 * self.square)[self._local_slice()]

    def render(self, centres: np.ndarray) -> np.ndarray:
        """Frames ``[..., size, size, channels]`` in [-1, 1] of squares at ``centres [..., 2]``."""
        return render_squares(centres, size=self.size, square=self.square, channels=self.channels)

    def batch(self, step: int, *, num_frames: int | None = None) -> dict[str, np.ndarray]:
        x = self.render(self.centres(step, num_frames=num_frames))
        return {"x": x, "label": np.zeros((x.shape[0],), np.int32)}


def render_squares(centres: np.ndarray, *, size: int, square: float,
                   channels: int = 1) -> np.ndarray:
    """Box-filter coverage of axis-aligned squares: intensity = overlap area, mapped to [-1, 1]."""
    centres = np.asarray(centres, np.float64)
    edges = np.arange(size, dtype=np.float64)
    lo = centres[..., None] - 0.5 * square                     # [..., 2, 1]
    overlap = np.clip(np.minimum(edges + 1, lo + square) - np.maximum(edges, lo), 0.0, 1.0)
    coverage = overlap[..., 0, :, None] * overlap[..., 1, None, :]   # [..., rows, cols]
    frames = (2.0 * coverage - 1.0).astype(np.float32)
    return np.repeat(frames[..., None], channels, axis=-1)


def get_video_dataset(data_config, *, global_batch_size: int, process_index: int = 0,
                      process_count: int = 1, seed: int = 0) -> BouncingSquares:
    """``config.data`` (name 'video') -> ``BouncingSquares`` (the ``get_dataset`` contract)."""
    if data_config.name != "video":
        raise ValueError(f"get_video_dataset expects config.data.name == 'video'; got "
                         f"{data_config.name!r}.")
    return BouncingSquares(num_frames=data_config.num_frames, size=data_config.size,
                           channels=data_config.get("channels", 1),
                           square=data_config.get("square", 4.0),
                           speed_min=data_config.get("speed_min", 0.5),
                           speed_max=data_config.get("speed_max", 1.5),
                           global_batch_size=global_batch_size, process_index=process_index,
                           process_count=process_count, seed=seed)
