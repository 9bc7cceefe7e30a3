"""What a run shows a person: metric writers, console progress with ETA, images, results.json.

Writers are clu's (TensorBoard event files) and are created on process 0 only; other processes
get a logging-only writer so multi-host runs write one set of files.
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np
from PIL import Image

from fdistill.workdir import write_json


class Monitor:
    """Scalars to TensorBoard (process 0) and one console line per log step with steps/s and ETA."""

    def __init__(self, workdir: str, total_steps: int, *, start_step: int = 0):
        from clu import metric_writers  # imports TensorFlow: keep it out of module import time
        self.writer = metric_writers.create_default_writer(
            workdir, just_logging=jax.process_index() > 0)
        self.total_steps = total_steps
        self._t0, self._s0 = time.time(), start_step

    def scalars(self, step: int, metrics: dict) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        self.writer.write_scalars(step, metrics)
        now = time.time()
        rate = (step - self._s0) / max(now - self._t0, 1e-9)
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        shown = "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        if jax.process_index() == 0:
            print(f"step {step}/{self.total_steps}  {rate:.2f} steps/s  eta {_hms(eta)}  {shown}",
                  flush=True)

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """HxWxC uint8 images (sample grids) to TensorBoard's Images tab."""
        self.writer.write_images(step, {k: np.asarray(v)[None] for k, v in images.items()})

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()

def _hms(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def image_grid(images: np.ndarray, *, ncols: int | None = None) -> np.ndarray:
    """Tiles NHWC images in [-1, 1] into one uint8 HxWxC grid."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.zeros((nrows * (h + 1) + 1, ncols * (w + 1) + 1, c), np.float32)
    for i, img in enumerate(images):
        r, k = divmod(i, ncols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = img
    return np.clip(np.round((grid + 1) * 127.5), 0, 255).astype(np.uint8)


def video_strip(clips: np.ndarray, *, max_clips: int = 4) -> np.ndarray:
    """Clips [B, T, H, W, C] in [-1, 1] as one uint8 image: a row of frames per clip."""
    clips = np.asarray(clips)[:max_clips]
    b, t = clips.shape[:2]
    return image_grid(clips.reshape(b * t, *clips.shape[2:]), ncols=t)


def sample_picture(x: np.ndarray, *, kind: str, extent: float = 3.0,
                   min_size: int = 128) -> np.ndarray:
    """What a sample batch looks like as one uint8 image: a density plot of 2-D points
    (``kind='toy'``), a strip of frames per clip (``'video'``) or an image grid; grids of small
    images are enlarged (nearest neighbour, whole pixels) to at least ``min_size`` on their
    short side, so 8x8 digits or 16x16 frames are visible at TensorBoard's actual size."""
    if kind == "toy":
        return density_image(x, extent=extent)[..., None]
    picture = video_strip(x) if kind == "video" else image_grid(np.asarray(x)[:64])
    return enlarge(picture, -(-min_size // min(picture.shape[:2])))


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement of an HxW or HxWxC image by a whole factor."""
    if scale <= 1:
        return np.asarray(image)
    return np.repeat(np.repeat(np.asarray(image), scale, axis=0), scale, axis=1)


def save_png(path: str, image: np.ndarray, *, scale: int = 1) -> None:
    """Saves an HxWxC (C in 1, 3) uint8 image, optionally enlarged by nearest-neighbour ``scale``."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    pil = Image.fromarray(image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pil.save(path)


def density_image(points: np.ndarray, *, extent: float, size: int = 160) -> np.ndarray:
    """A 2-D point cloud as a uint8 grey-scale density image (dark = many points), no matplotlib."""
    points = np.asarray(points)
    hist, _, _ = np.histogram2d(points[:, 1], points[:, 0], bins=size,
                                range=[[-extent, extent], [-extent, extent]])
    hist = np.log1p(hist[::-1])
    hist = hist / max(hist.max(), 1e-9)
    return (255 * (1 - hist)).astype(np.uint8)


def panel_row(images: list[np.ndarray], *, gap: int = 4,
              titles: list[str] | None = None) -> np.ndarray:
    """Concatenates uint8 images side by side with white gaps, aligned at the top; with
    ``titles``, each panel gets its title (one to three lines, PIL's built-in font) in a white
    band above it. Grey panels (HxW or HxWx1) give an HxW row; if any panel is RGB, an HxWx3
    row (grey panels repeated over the channels)."""
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} panels")
    images = _common_channels(images)
    if titles is not None:
        images = [_titled(img, title) for img, title in zip(images, titles)]
    h = max(img.shape[0] for img in images)
    pad = [(0, 0)] * (images[0].ndim - 2)
    images = [np.pad(img, [(0, h - img.shape[0]), (0, 0)] + pad, constant_values=255)
              for img in images]
    sep = np.full((h, gap) + images[0].shape[2:], 255, np.uint8)
    parts = []
    for img in images:
        parts += [img, sep]
    return np.concatenate(parts[:-1], axis=1)


def panel_grid(images: list[np.ndarray], *, titles: list[str] | None = None, ncols: int = 6,
               gap: int = 4) -> np.ndarray:
    """``panel_row`` of ``ncols`` panels at a time, rows stacked with white gaps (and padded to
    the widest row on the right)."""
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} panels")
    images = _common_channels(images)
    rows = [panel_row(images[i:i + ncols], gap=gap,
                      titles=None if titles is None else titles[i:i + ncols])
            for i in range(0, len(images), ncols)]
    w = max(r.shape[1] for r in rows)
    pad = [(0, 0)] * (rows[0].ndim - 2)
    rows = [np.pad(r, [(0, 0), (0, w - r.shape[1])] + pad, constant_values=255) for r in rows]
    sep = np.full((gap, w) + rows[0].shape[2:], 255, np.uint8)
    parts = []
    for r in rows:
        parts += [r, sep]
    return np.concatenate(parts[:-1], axis=0)


def _common_channels(images: list[np.ndarray]) -> list[np.ndarray]:
    """uint8 HxW panels, or all HxWx3 when any panel is RGB."""
    out = []
    for img in images:
        img = np.asarray(img, np.uint8)
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] != 3):
            raise ValueError(f"a panel must be HxW, HxWx1 or HxWx3, not {img.shape}")
        out.append(img)
    if any(img.ndim == 3 for img in out):
        out = [img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=-1) for img in out]
    return out


def _titled(image: np.ndarray, title: str, *, line_height: int = 11,
            max_lines: int = 3) -> np.ndarray:
    """An HxW or HxWx3 uint8 image with ``title`` (lines split on newlines, at most
    ``max_lines``) written in black in a white band above it."""
    from PIL import ImageDraw
    lines = title.split("\n")
    if len(lines) > max_lines:
        raise ValueError(f"the panel title {title!r} has {len(lines)} lines; at most {max_lines} "
                         f"fit above a panel: join some of them.")
    rgb = image.ndim == 3
    band = Image.new("RGB" if rgb else "L", (image.shape[1], line_height * max_lines + 4),
                     (255, 255, 255) if rgb else 255)
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((2, 2 + i * line_height), line, fill=(0, 0, 0) if rgb else 0)
    return np.concatenate([np.asarray(band, np.uint8), np.asarray(image, np.uint8)], axis=0)


def write_results(workdir: str, results: dict) -> str:
    """Merges ``results`` into ``workdir/results.json`` (machine-readable final metrics).

    Written atomically, so a run killed mid-write leaves the previous file; an existing file that
    is not a JSON object (damaged by other means) is kept as ``results.json.invalid`` with a
    warning and replaced.
    """
    path = os.path.join(workdir, "results.json")
    if jax.process_index() != 0:
        return path
    old = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
            if not isinstance(old, dict):
                raise ValueError(f"a JSON {type(old).__name__}, not an object")
        except ValueError as e:
            os.replace(path, f"{path}.invalid")
            logging.warning("%s was not valid results JSON (%s); kept as %s.invalid and "
                            "replaced", path, e, path)
            old = {}
    old.update(results)
    os.makedirs(workdir, exist_ok=True)
    write_json(path, old, default=_jsonable)
    return path


def _jsonable(x):
    if isinstance(x, (np.generic, np.ndarray)) or hasattr(x, "__array__"):
        return np.asarray(x).tolist()
    return str(x)
