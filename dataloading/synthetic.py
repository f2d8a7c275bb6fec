"""make_synthetic_imagefolder: a small real-JPEG ImageFolder that a model learns in a few steps.

Each image is low-contrast noise with one to three filled shapes of its class drawn at random
positions and sizes. A class is a (colour, shape) pair: colours are spread around the hue circle
and the shape kind cycles through disc, square and triangle, so classes differ locally (what a
token sees) as well as globally. Everything is drawn from a generator seeded by
(seed, split, class, index), so the files are the same for a seed whatever else changes.
"""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np

SHAPES = ("disc", "square", "triangle")


def class_names(num_classes: int) -> list[str]:
    """Folder names that sort in class order: class_00, class_01, ..."""
    width = max(2, len(str(num_classes - 1)))
    return [f"class_{c:0{width}d}" for c in range(num_classes)]


def class_colour(c: int, num_classes: int) -> tuple[int, int, int]:
    h = (c * 0.61803398875) % 1.0 if num_classes > 12 else c / num_classes
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_image(rng: np.random.Generator, c: int, num_classes: int, size: int):
    from PIL import Image, ImageDraw

    base = rng.integers(70, 150, 3)
    noise = rng.normal(0.0, 18.0, (size, size, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    colour = class_colour(c, num_classes)
    shape = SHAPES[c % len(SHAPES)]
    for _ in range(int(rng.integers(1, 4))):
        r = float(rng.uniform(0.12, 0.28)) * size
        cx, cy = rng.uniform(r, size - r, 2)
        jitter = tuple(int(np.clip(v + rng.integers(-12, 13), 0, 255)) for v in colour)
        if shape == "disc":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter)
        elif shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=jitter)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=jitter)
    return img


def make_synthetic_imagefolder(root, num_classes: int = 4, per_class: int = 8, size: int = 64,
                               seed: int = 0, val_per_class: int = 2, quality: int = 90) -> Path:
    """Write ``root/train/<class>/*.JPEG`` (``per_class`` each) and ``root/val/<class>/*.JPEG``
    (``val_per_class`` each), ``size`` x ``size`` RGB JPEGs; returns ``root`` as a Path.

    Deterministic for a seed; files already there with the same names are overwritten.
    """
    for name, v, lo in (("num_classes", num_classes, 1), ("per_class", per_class, 1), ("size", size, 8),
                        ("val_per_class", val_per_class, 0)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    root = Path(root)
    names = class_names(num_classes)
    for split_id, (split, count) in enumerate((("train", per_class), ("val", val_per_class))):
        for c, cname in enumerate(names):
            folder = root / split / cname
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, split_id, c, i])
                draw_image(rng, c, num_classes, size).save(folder / f"{cname}_{i:05d}.JPEG", "JPEG",
                                                            quality=quality)
    return root
