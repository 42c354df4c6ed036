"""The README's pictures exist in the repository and stay small."""
import re

from PIL import Image
from recipes import REPO

MAX_BYTES = 100_000


def test_every_picture_the_readme_shows_is_a_small_png_in_the_repository():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    sources = re.findall(r'<img src="([^"]+)"', readme) + re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", readme)
    assert len(sources) >= 2  # the curves and an overlay
    for source in sources:
        path = REPO / source
        assert path.is_file(), source
        assert path.stat().st_size < MAX_BYTES, (source, path.stat().st_size)
        with Image.open(path) as image:
            assert image.format == "PNG", source
