"""Contact sheets: a grid of images with their captions printed under each (demo, eval, training samples)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = ["contact_sheet"]


def contact_sheet(images: Sequence[Image.Image], captions: Sequence[str], *, columns: int = 4,
                  cell: int = 192, caption_lines: int = 3) -> Image.Image:
    """Lay ``images`` out on a white grid, each scaled to ``cell`` px with its caption wrapped below.

    Small images (the built-in model makes 64x64) are scaled with NEAREST so pixels stay crisp.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    font = ImageFont.load_default()
    line_h = 12
    text_h = caption_lines * line_h + 6
    cols = max(1, min(columns, len(images)))
    rows = max(1, (len(images) + cols - 1) // cols)
    pad = 8
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    chars = max(8, cell // 6)
    for i, (img, caption) in enumerate(zip(images, captions, strict=True)):
        r, c = divmod(i, cols)
        x, y = pad + c * (cell + pad), pad + r * (cell + text_h + pad)
        resample = Image.Resampling.NEAREST if max(img.size) < cell else Image.Resampling.LANCZOS
        sheet.paste(img.convert("RGB").resize((cell, cell), resample), (x, y))
        for j, line in enumerate(textwrap.wrap(caption, chars)[:caption_lines]):
            draw.text((x, y + cell + 3 + j * line_h), line, fill="black", font=font)
    return sheet
