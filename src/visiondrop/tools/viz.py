"""Pictures of what a method kept: one panel per stage over the image's patch grid.

In every panel a patch is drawn one of three ways:

- **kept**: it survives as its own token (bright, white outline);
- **merged**: it was folded into a token that stands for several patches (tinted with that token's colour; the token's
  anchor patch is outlined in the same colour);
- **dropped**: nothing carries it any more (darkened).
"""

from __future__ import annotations

import colorsys
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..report import ImageReport, StageView

__all__ = ["draw_stages", "save_stages"]

_PANEL = 336
_TITLE = 22


def _palette(count: int) -> list[tuple[int, int, int]]:
    colours = []
    for i in range(max(count, 1)):
        hue = (i * 0.618034) % 1.0  # golden-ratio steps keep neighbouring groups apart
        r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


def _panel(image: Image.Image, grid: tuple[int, int], first: int, view: StageView) -> Image.Image:
    """One grid (patches ``first .. first + rows*cols - 1`` of the image) after one stage."""
    rows, cols = grid
    base = image.convert("RGB").resize((_PANEL, _PANEL))
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    cell_w, cell_h = _PANEL / cols, _PANEL / rows

    groups: dict[int, list[int]] = defaultdict(list)
    for patch, owner in enumerate(view.patch_owner[first : first + rows * cols]):
        groups[owner].append(patch)
    merged_owners = [o for o, patches in groups.items() if o >= 0 and len(patches) > 1]
    colour_of = dict(zip(merged_owners, _palette(len(merged_owners)), strict=False))

    def box(patch: int) -> tuple[float, float, float, float]:
        r, c = divmod(patch, cols)
        return (c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1)

    for owner, patches in groups.items():
        for patch in patches:
            if owner < 0:
                draw.rectangle(box(patch), fill=(0, 0, 0, 185))
            elif owner in colour_of:
                draw.rectangle(box(patch), fill=(*colour_of[owner], 110))
            else:
                draw.rectangle(box(patch), outline=(255, 255, 255, 230))
    for owner, colour in colour_of.items():
        anchor = (view.token_patch[owner] if owner < len(view.token_patch) else -1) - first
        if 0 <= anchor < rows * cols:
            draw.rectangle(box(anchor), outline=(*colour, 255), width=2)
    return Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")


def draw_stages(image: Image.Image, report: ImageReport, title: str = "") -> Image.Image:
    """One picture with a panel per stage (the unpruned grid first), titled with the token counts.

    Images with several grids (LLaVA-NeXT's base and high-resolution views) get one row of panels per grid.

    Parameters
    ----------
    image : PIL.Image.Image
        The image as the user gave it (it is resized to the panel size).
    report : ImageReport
        One image of a :class:`~visiondrop.report.Report`.
    title : str
        Text above the panels (e.g. the method and budget).
    """
    if not report.grids:
        raise ValueError("this image has no patch grid to draw on (features passed in by the caller)")
    patches = sum(h * w for h, w in report.grids)
    full = StageView(
        layer=-1, tokens=report.image_tokens, contextual=0, token_patch=[], patch_owner=list(range(patches))
    )
    views = [full, *report.stages]
    header = _TITLE * (2 if title else 1)
    height = header + len(report.grids) * (_PANEL + 8)
    canvas = Image.new("RGB", (len(views) * (_PANEL + 8) + 8, height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if title:
        draw.text((8, 4), title, fill=(235, 235, 235), font=font)
    for i, view in enumerate(views):
        x = 8 + i * (_PANEL + 8)
        if view.layer < 0:
            label = f"input: {report.image_tokens} tokens"
        else:
            merged = (
                f" ({view.tokens - view.contextual} kept + {view.contextual} merged)"
                if view.contextual
                else ""
            )
            label = f"{view.name}: {view.tokens}{merged}"
        draw.text((x, header - _TITLE + 4), label, fill=(235, 235, 235), font=font)
        first = 0
        for g, grid in enumerate(report.grids):
            canvas.paste(_panel(image, grid, first, view), (x, header + g * (_PANEL + 8)))
            first += grid[0] * grid[1]
    return canvas


def save_stages(image: Image.Image, report: ImageReport, path: str | Path, title: str = "") -> Path:
    """Draw :func:`draw_stages` and write it as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_stages(image, report, title).save(path, format="PNG")
    return path
