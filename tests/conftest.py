"""Shared fixtures: a private excite cache for the whole session and small generated image folders."""
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: Class name -> base colour. A model separates these in an epoch or two, so training visibly learns.
CLASS_COLOURS = {"blue": (30, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}


def write_image_folder(root: Path, per_class: int = 12, side: int = 16, colours: dict = CLASS_COLOURS,
                       seed: int = 0) -> Path:
    """``root/<class>/<n>.png``: ``per_class`` noisy ``side`` x ``side`` images in each class's colour."""
    rng = np.random.default_rng(seed)
    for name, colour in colours.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            # +-40 of noise per pixel: images differ from each other but keep their class's colour.
            pixels = np.clip(np.array(colour) + rng.integers(-40, 41, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(autouse=True, scope="session")
def excite_cache_dir(tmp_path_factory) -> Path:
    """Point ``EXCITE_CACHE_DIR`` (scan cache, digits) into a temporary folder for every test and every
    subprocess a test starts, so tests never read or write the user's cache."""
    path = tmp_path_factory.mktemp("excite-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXCITE_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def make_image_folder() -> Callable[..., Path]:
    """The :func:`write_image_folder` function, for tests and fixtures that need their own folder."""
    return write_image_folder


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A fresh learnable image folder: classes blue, green, red with 12 16x16 PNGs each."""
    return write_image_folder(tmp_path / "images")
