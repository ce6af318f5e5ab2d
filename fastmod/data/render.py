"""2-D rendering of a scene with Pillow, so that every attribute is visible.

Shape: outline (sphere = disc, cube = square with a top and a side face,
cylinder = upright body with elliptical caps).  Colour: CLEVR's RGB values.
Size: the world radius.  Material: metal is dark-bodied with a white specular
highlight (shiny), rubber is flat with soft shading (matte).  Objects are drawn
back to front; the scene sampler keeps footprints apart, so none is hidden.
Drawn supersampled and box-filtered down, which keeps edges clean at 64x64.
"""
from __future__ import annotations

from PIL import Image, ImageDraw

from fastmod.data.scene import COLOR_RGB, project


def _tint(rgb, k):
    return tuple(max(0, min(255, int(c * k))) for c in rgb)


def _mix(rgb, other, t):
    return tuple(int(a * (1 - t) + b * t) for a, b in zip(rgb, other))


WHITE = (255, 255, 255)


def _sphere(d, u, cy, R, c, metal, lw):
    if metal:
        d.ellipse([u - R, cy - R, u + R, cy + R], fill=_tint(c, 0.55), outline=_tint(c, 0.35), width=lw)
        r2, o = 0.72 * R, 0.18 * R
        d.ellipse([u - o - r2, cy - o - r2, u - o + r2, cy - o + r2], fill=_tint(c, 0.9))
        r3, o = 0.24 * R, 0.38 * R
        d.ellipse([u - o - r3, cy - o - r3, u - o + r3, cy - o + r3], fill=WHITE)
    else:
        d.ellipse([u - R, cy - R, u + R, cy + R], fill=_tint(c, 0.72), outline=_tint(c, 0.5), width=lw)
        r2, o = 0.84 * R, 0.12 * R
        d.ellipse([u - o - r2, cy - o - r2, u - o + r2, cy - o + r2], fill=c)


def _cube(d, u, cy, R, c, metal, lw):
    a, k = 0.78 * R, 0.42 * R  # half side, receding-edge offset
    x0, x1, y0, y1 = u - a - k / 2, u + a - k / 2, cy - a + k / 2, cy + a + k / 2
    top = [(x0, y0), (x1, y0), (x1 + k, y0 - k), (x0 + k, y0 - k)]
    side = [(x1, y0), (x1 + k, y0 - k), (x1 + k, y1 - k), (x1, y1)]
    front, top_c, side_c = ((_tint(c, 0.7), _mix(c, WHITE, 0.35), _tint(c, 0.45)) if metal
                            else (c, _mix(c, WHITE, 0.18), _tint(c, 0.72)))
    line = _tint(c, 0.3 if metal else 0.5)
    d.polygon(top, fill=top_c, outline=line, width=lw)
    d.polygon(side, fill=side_c, outline=line, width=lw)
    d.rectangle([x0, y0, x1, y1], fill=front, outline=line, width=lw)
    if metal:  # specular glint on the front face and a bright top edge
        g = 0.3 * a
        d.ellipse([x0 + 0.35 * a - g, y0 + 0.35 * a - g, x0 + 0.35 * a + g, y0 + 0.35 * a + g], fill=WHITE)
        d.line([(x0, y0), (x1, y0)], fill=WHITE, width=max(1, lw))


def _cylinder(d, u, cy, R, c, metal, lw):
    a, h = 0.72 * R, 0.78 * R
    e = 0.38 * a
    yt, yb = cy - h + e / 2, cy + h - e / 2
    body, top_c = ((_tint(c, 0.65), _mix(c, WHITE, 0.3)) if metal else (c, _mix(c, WHITE, 0.18)))
    line = _tint(c, 0.3 if metal else 0.5)
    d.ellipse([u - a, yb - e, u + a, yb + e], fill=body, outline=line, width=lw)
    d.rectangle([u - a, yt, u + a, yb], fill=body)
    d.line([(u - a, yt), (u - a, yb)], fill=line, width=lw)
    d.line([(u + a, yt), (u + a, yb)], fill=line, width=lw)
    if metal:  # vertical specular stripe
        d.rectangle([u - 0.55 * a, yt, u - 0.2 * a, yb + 0.6 * e], fill=WHITE)
    else:      # matte: soft darker right side
        d.rectangle([u + 0.45 * a, yt, u + a - lw, yb + 0.5 * e], fill=_tint(c, 0.8))
    d.ellipse([u - a, yt - e, u + a, yt + e], fill=top_c, outline=line, width=lw)


_DRAW = {"sphere": _sphere, "cube": _cube, "cylinder": _cylinder}


def _background(size: int) -> Image.Image:
    # floor lit from the front: slightly darker towards the back
    col = Image.linear_gradient("L").resize((size, size))
    return Image.merge("RGB", [col.point(lambda p: 128 + p * 40 // 255)] * 3)


_BG_CACHE: dict[int, Image.Image] = {}


def render_scene(scene: dict, image_size: int = 128, supersample: int | None = None) -> Image.Image:
    """Draw ``scene`` (a CLEVR scene dict) as an RGB ``image_size`` x ``image_size`` image."""
    ss = supersample or (4 if image_size <= 96 else 2)
    big = image_size * ss
    if big not in _BG_CACHE:
        _BG_CACHE[big] = _background(big)
    img = _BG_CACHE[big].copy()
    d = ImageDraw.Draw(img)
    lw = max(1, ss * image_size // 128)
    order = sorted(range(len(scene["objects"])), key=lambda i: -scene["objects"][i]["3d_coords"][1])
    for i in order:
        o = scene["objects"][i]
        x, y, r = o["3d_coords"]
        u, v, s = project(x, y, big)
        R = r * s
        _DRAW[o["shape"]](d, u, v - 0.25 * R, R, COLOR_RGB[o["color"]], o["material"] == "metal", lw)
    return img.resize((image_size, image_size), Image.BOX)
