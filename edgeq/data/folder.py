"""ImageFolder trees: ``root/<class>/<image>``, classes in sorted folder order."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, UnidentifiedImageError

from edgeq.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"})


def _is_image(path: Path) -> bool:
    """By name: an image-named entry that is not a file (a broken link, a pipe) is listed and refused on reading,
    rather than silently left out of the data set."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.is_dir()


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_class_root(folder: Path) -> Path:
    """The folder whose subfolders are the classes.

    Archives wrap the tree in one top folder (``val/``, ``imagenet-sample/``);
    descend through such single wrappers as long as they hold folders, not images.
    """
    root = folder
    while True:
        subdirs = _subdirs(root)
        if len(subdirs) != 1:
            return root
        only = subdirs[0]
        if any(_is_image(p) for p in only.iterdir()) or not _subdirs(only):
            return root
        root = only


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


class ImageFolder:
    """A list of (image path, class index) pairs with clear errors for malformed trees."""

    def __init__(self, folder: Path, transform: Callable | None = None):
        root = find_class_root(Path(folder))
        class_dirs = _subdirs(root)
        if not class_dirs:
            raise DataError(f"{folder} has no class folders (expected <root>/<class>/<image>)")
        self.root = root
        self.classes = [d.name for d in class_dirs]
        self.samples = [
            Sample(path, label)
            for label, class_dir in enumerate(class_dirs)
            for path in sorted(class_dir.iterdir())
            if _is_image(path)
        ]
        if not self.samples:
            raise DataError(f"{folder} has class folders but no images")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def load_image(self, index: int) -> Image.Image:
        path = self.samples[index].path
        if not path.is_file():  # a pipe or device named *.png would block or never end
            raise DataError(f"unreadable image {path}: not a regular file (a broken link, a device or a pipe)")
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except Image.DecompressionBombError:
            raise DataError(f"image {path} is too large to decode safely (more than "
                            f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels): a decompression bomb or not a data set image") \
                from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"unreadable image {path}: {exc}") from None

    def __getitem__(self, index: int):
        image = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.samples[index].label
