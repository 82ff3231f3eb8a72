"""Emoji pictures from the Noto Color Emoji font, captioned with their Unicode names."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from PIL import Image, ImageDraw, ImageFont

FONT_PATH = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST_PATH = "usr/share/unicode/emoji/emoji-test.txt"
# NotoColorEmoji is a CBDT bitmap font whose strikes exist only at this size.
FONT_SIZE = 109

# "1F600 ; fully-qualified # 😀 E1.0 grinning face"
_LINE = re.compile(r"^(?P<cps>[0-9A-Fa-f ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+E\d+\.\d+\s+(?P<name>.+?)\s*$")


@dataclass(frozen=True)
class Emoji:
    text: str
    name: str

    @property
    def relpath(self) -> str:
        return "emoji/" + "-".join(f"{ord(ch):x}" for ch in self.text) + ".png"


def list_emoji(root: Path) -> list[Emoji]:
    """Every fully-qualified emoji in emoji-test.txt, in file order."""
    path = root / EMOJI_TEST_PATH
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the unicode-data package was not unpacked under {root}")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _LINE.match(line)
        if match:
            text = "".join(chr(int(cp, 16)) for cp in match["cps"].split())
            out.append(Emoji(text=text, name=match["name"]))
    if not out:
        raise ValueError(f"{path}: no fully-qualified emoji lines found; is this Unicode's emoji-test.txt?")
    return out


@functools.lru_cache(maxsize=2)
def _font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, FONT_SIZE)


def render_emoji(root: Path, emoji: Emoji) -> Image.Image:
    """Draw one emoji in colour, centred on a white square canvas (RGB)."""
    font = _font(str(root / FONT_PATH))
    # Whole pixels at stroke width 0; Pillow annotates floats for fractional stroke widths.
    left, top, right, bottom = cast("tuple[int, int, int, int]", font.getbbox(emoji.text))
    side = max(right - left, bottom - top, 1)
    glyph = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    offset = ((side - (right - left)) // 2 - left, (side - (bottom - top)) // 2 - top)
    ImageDraw.Draw(glyph).text(offset, emoji.text, font=font, embedded_color=True)
    canvas = Image.new("RGBA", glyph.size, (255, 255, 255, 255))
    canvas.alpha_composite(glyph)
    return canvas.convert("RGB")
