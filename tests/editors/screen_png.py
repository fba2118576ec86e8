"""Render a terminal screen captured with `tmux capture-pane -e -p` (text + SGR colour codes) to a PNG.

Used for the Neovim screenshots; needs Pillow and a monospace TrueType font (DejaVu Sans Mono), and returns False
when either is missing so the tests can go on without the picture.
"""

from __future__ import annotations

import re
from pathlib import Path

SGR = re.compile(r"\x1b\[([0-9;:]*)m")
FONTS = ["/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf", "/usr/share/fonts/dejavu/DejaVuSansMono.ttf"]
BASE16 = [(0, 0, 0), (205, 49, 49), (13, 188, 121), (229, 229, 16), (36, 114, 200), (188, 63, 188), (17, 168, 205),
          (229, 229, 229), (102, 102, 102), (241, 76, 76), (35, 209, 139), (245, 245, 67), (59, 142, 234),
          (214, 112, 214), (41, 184, 219), (255, 255, 255)]
FOREGROUND, BACKGROUND = (220, 220, 220), (20, 22, 28)


def _xterm256(index: int) -> tuple[int, int, int]:
    if index < 16:
        return BASE16[index]
    if index < 232:
        index -= 16
        steps = [0, 95, 135, 175, 215, 255]
        return steps[index // 36], steps[(index // 6) % 6], steps[index % 6]
    level = 8 + 10 * (index - 232)
    return level, level, level


def parse(screen: str) -> list[list[tuple[str, tuple[int, int, int], tuple[int, int, int], bool]]]:
    """Rows of cells: (character, foreground, background, bold)."""
    rows = []
    fg, bg, bold, reverse = FOREGROUND, BACKGROUND, False, False
    for line in screen.split("\n"):
        cells = []
        position = 0
        for match in list(SGR.finditer(line)) + [None]:
            end = match.start() if match else len(line)
            for char in line[position:end]:
                cells.append((char, bg if reverse else fg, fg if reverse else bg, bold))
            if match is None:
                break
            position = match.end()
            codes = [int(c) if c else 0 for c in re.split("[;:]", match.group(1) or "0")]
            i = 0
            while i < len(codes):
                code = codes[i]
                if code == 0:
                    fg, bg, bold, reverse = FOREGROUND, BACKGROUND, False, False
                elif code == 1:
                    bold = True
                elif code == 22:
                    bold = False
                elif code == 7:
                    reverse = True
                elif code == 27:
                    reverse = False
                elif 30 <= code <= 37 or 90 <= code <= 97:
                    fg = BASE16[code - 30 if code < 90 else code - 82]
                elif 40 <= code <= 47 or 100 <= code <= 107:
                    bg = BASE16[code - 40 if code < 100 else code - 92]
                elif code == 39:
                    fg = FOREGROUND
                elif code == 49:
                    bg = BACKGROUND
                elif code in (38, 48) and i + 1 < len(codes):
                    if codes[i + 1] == 5 and i + 2 < len(codes):
                        color = _xterm256(codes[i + 2])
                        i += 2
                    elif codes[i + 1] == 2 and i + 4 < len(codes):
                        color = (codes[i + 2], codes[i + 3], codes[i + 4])
                        i += 4
                    else:
                        break
                    if code == 38:
                        fg = color
                    else:
                        bg = color
                i += 1
        rows.append(cells)
    return rows


def render(screen: str, path: Path, columns: int, rows: int, font_size: int = 15) -> bool:
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        return False
    font_path = next((font for font in FONTS if Path(font).exists()), None)
    if font_path is None:
        return False
    font = ImageFont.truetype(font_path, font_size)
    bold_path = font_path.replace("SansMono.ttf", "SansMono-Bold.ttf")
    bold_font = ImageFont.truetype(bold_path, font_size) if Path(bold_path).exists() else font
    cell_w = round(font.getlength("M"))
    cell_h = round(font_size * 1.35)
    image = Image.new("RGB", (columns * cell_w + 16, rows * cell_h + 16), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for y, cells in enumerate(parse(screen)[:rows]):
        for x, (char, fg, bg, bold) in enumerate(cells[:columns]):
            left, top = 8 + x * cell_w, 8 + y * cell_h
            if bg != BACKGROUND:
                draw.rectangle([left, top, left + cell_w - 1, top + cell_h - 1], fill=bg)
            if char.strip():
                draw.text((left, top + 2), char, fill=fg, font=bold_font if bold else font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return True
