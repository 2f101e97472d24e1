"""The fonts the synthetic images are printed in: Debian's DejaVu, Liberation and WenQuanYi Micro Hei."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from PIL import ImageFont

FONT_ROOT = Path("/usr/share/fonts/truetype")


@dataclass(frozen=True)
class FontFace:
    family: str
    bold: bool
    path: Path
    # WenQuanYi has no bold face: bold is drawn with a stroke around the glyphs.
    fake_bold: bool = False


LATIN_FACES = (
    FontFace("DejaVu Sans", False, FONT_ROOT / "dejavu/DejaVuSans.ttf"),
    FontFace("DejaVu Sans", True, FONT_ROOT / "dejavu/DejaVuSans-Bold.ttf"),
    FontFace("DejaVu Serif", False, FONT_ROOT / "dejavu/DejaVuSerif.ttf"),
    FontFace("DejaVu Serif", True, FONT_ROOT / "dejavu/DejaVuSerif-Bold.ttf"),
    FontFace("Liberation Sans", False, FONT_ROOT / "liberation/LiberationSans-Regular.ttf"),
    FontFace("Liberation Sans", True, FONT_ROOT / "liberation/LiberationSans-Bold.ttf"),
)
CJK_FACES = (
    FontFace("WenQuanYi Micro Hei", False, FONT_ROOT / "wqy/wqy-microhei.ttc"),
    FontFace("WenQuanYi Micro Hei", True, FONT_ROOT / "wqy/wqy-microhei.ttc", fake_bold=True),
)
DEBIAN_PACKAGES = {"dejavu": "fonts-dejavu-core", "liberation": "fonts-liberation", "wqy": "fonts-wqy-microhei"}


def check_fonts() -> None:
    """A clear message naming the Debian package when a font file is missing."""
    missing = sorted({face.path for face in (*LATIN_FACES, *CJK_FACES) if not face.path.is_file()})
    if missing:
        packages = sorted({DEBIAN_PACKAGES[path.parent.name] for path in missing})
        raise FileNotFoundError(
            f"font files missing: {', '.join(str(p) for p in missing)}; "
            f"install them with `apt-get install -y {' '.join(packages)}` (scripts/setup_env.sh does it)"
        )


@functools.lru_cache(maxsize=512)
def load_font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)
