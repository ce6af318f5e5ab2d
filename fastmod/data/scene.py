"""CLEVR's attribute vocabulary and random scenes in CLEVR's ``scenes`` JSON form.

World frame (like CLEVR's ground plane): ``x`` to the right, ``y`` away from the
camera ("behind"), ``z`` up; objects stand on ``z = 0`` within ``[-3, 3]^2``.
Scene dicts match ``scenes/CLEVR_{split}_scenes.json`` entries: ``objects``
(shape/color/size/material/3d_coords/pixel_coords/rotation), ``relationships``
({left,right,front,behind}: for object ``i`` the sorted list of objects in that
direction from it) and ``directions``.
"""
from __future__ import annotations

import math

import random

SIZES = ("large", "small")
COLORS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
MATERIALS = ("rubber", "metal")
SHAPES = ("cube", "sphere", "cylinder")
ATTRIBUTES = ("size", "color", "material", "shape")
VALUES = {"size": SIZES, "color": COLORS, "material": MATERIALS, "shape": SHAPES}
RELATIONS = ("left", "right", "front", "behind")
# CLEVR's 28 answers.
CLEVR_ANSWERS = (("yes", "no") + tuple(str(i) for i in range(11)) + COLORS + SIZES + MATERIALS + SHAPES)

COLOR_RGB = {
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51),
}
RADIUS = {"large": 0.85, "small": 0.5}  # world units; CLEVR uses 0.7 / 0.35
DIRECTIONS = {"left": (-1.0, 0.0, 0.0), "right": (1.0, 0.0, 0.0), "behind": (0.0, 1.0, 0.0),
              "front": (0.0, -1.0, 0.0), "above": (0.0, 0.0, 1.0), "below": (0.0, 0.0, -1.0)}
EXTENT = 3.0        # objects' centres lie in [-EXTENT, EXTENT]^2
MARGIN = 0.3        # every pair differs by this much along x and y, so relations are visible
MIN_OBJECTS, MAX_OBJECTS = 3, 10


def project(x: float, y: float, image_size: int) -> tuple[float, float, float]:
    """Ground point -> (column, row, pixels per world unit) in an image_size^2 image.

    A mild perspective: farther objects sit higher and are drawn 15% smaller at the
    back, so size stays readable while depth order is visible."""
    depth = (y + EXTENT) / (2 * EXTENT)           # 0 front .. 1 back
    scale = image_size / 7.8 * (1.0 - 0.15 * depth)
    u = image_size / 2 + x * scale
    v = image_size * (0.80 - 0.56 * depth)
    return u, v, scale


def compute_relationships(objects: list[dict]) -> dict[str, list[list[int]]]:
    """CLEVR's rule: j is ``rel`` of i when (p_j - p_i) . direction(rel) > 0."""
    rel = {}
    for name in RELATIONS:
        d = DIRECTIONS[name]
        rel[name] = [
            [j for j, b in enumerate(objects)
             if j != i and sum((cb - ca) * dc for ca, cb, dc in zip(a["3d_coords"], b["3d_coords"], d)) > 1e-6]
            for i, a in enumerate(objects)
        ]
    return rel


def _fits(x, y, r, placed) -> bool:
    u, v, s = project(x, y, 1.0)
    for (x2, y2, r2, u2, v2, s2) in placed:
        if abs(x - x2) < MARGIN or abs(y - y2) < MARGIN:
            return False
        # footprints (screen circles) must not overlap: nothing is hidden completely
        if math.hypot(u - u2, v - v2) < 1.08 * (r * s + r2 * s2):
            return False
    return True


def sample_scene(rng: random.Random, image_size: int, num_objects: int | None = None) -> dict:
    """A random scene of 3-10 objects with CLEVR attributes and relationships."""
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS) if num_objects is None else num_objects
    while True:
        objects, placed = [], []
        for _ in range(n):
            size = rng.choice(SIZES)
            r = RADIUS[size]
            for _try in range(60):
                x, y = rng.uniform(-EXTENT, EXTENT), rng.uniform(-EXTENT, EXTENT)
                if _fits(x, y, r, placed):
                    break
            else:
                break  # no room: start the scene again
            placed.append((x, y, r) + project(x, y, 1.0))
            u, v, _ = project(x, y, image_size)
            objects.append({
                "shape": rng.choice(SHAPES), "color": rng.choice(COLORS), "size": size,
                "material": rng.choice(MATERIALS),
                "3d_coords": [round(x, 4), round(y, 4), r],
                "pixel_coords": [int(round(u)), int(round(v)), round(EXTENT - y, 4)],
                "rotation": 0.0,
            })
        if len(objects) == n:
            break
    return {"objects": objects, "relationships": compute_relationships(objects),
            "directions": {k: list(v) for k, v in DIRECTIONS.items()}}
