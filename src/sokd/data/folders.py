"""Image folders (`imagefolder`, `imagenet`): train/ and val/ trees read by torchvision's ImageFolder.

Every image goes through `read_image`, so one that cannot be opened or decoded is an
`UnreadableImage` naming its file (LoaderBatches stops the run with it, or skips the file).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import SokdError
from .paths import search_roots
from .sources import UnreadableImage

IMAGENET_DEFAULTS = ("data/imagenet", "~/.cache/sokd/imagenet", "/usr/share/datasets/imagenet")


def find_image_folder(name: str, root: str | None) -> Path:
    if root is None and name == "imagefolder":
        raise SokdError("data.root is required for imagefolder: a directory with train/ and val/ "
                        "class sub-folders (torchvision ImageFolder layout)")
    for cand in search_roots(root, IMAGENET_DEFAULTS):
        if (cand / "train").is_dir() and (cand / "val").is_dir():
            return cand
    if root is None:
        raise SokdError(f"ImageNet not found (looked in {', '.join(IMAGENET_DEFAULTS)}); set data.root to a "
                        f"directory with train/ and val/ class sub-folders")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise SokdError(f"data.root '{path}' is not a directory; point it at a folder with train/ and val/")
    missing = [s for s in ("train", "val") if not (path / s).is_dir()]
    raise SokdError(f"data.root '{path}' has no {' or '.join(m + '/' for m in missing)} folder; an image "
                    f"folder data set needs train/ and val/, each with one sub-folder per class")


def read_image(path: str):
    """The RGB PIL image in `path`; any failure to open or decode it is an UnreadableImage."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as err:  # PIL signals bad data with OSError, SyntaxError, ValueError, ...
        raise UnreadableImage(path, " ".join(str(err).split()) or type(err).__name__) from err


def image_folders(root: Path, train_transform, val_transform):
    """(train, val) torchvision ImageFolders; val's labels use train's class -> index mapping."""
    from torchvision.datasets import ImageFolder

    def build(path: Path, transform, allow_empty: bool):
        try:
            return ImageFolder(str(path), transform=transform, loader=read_image, allow_empty=allow_empty)
        except FileNotFoundError as err:
            raise SokdError(f"'{path}': {err}; put images (.png, .jpg, ...) in one sub-folder per class") from None

    train = build(root / "train", train_transform, False)
    val = build(root / "val", val_transform, True)
    extra = [c for c in val.classes if c not in train.class_to_idx]
    if extra:
        raise SokdError(f"'{root / 'val'}' has class folders not in train/: {', '.join(extra[:5])}; "
                        f"train/ and val/ need the same class names")
    if len(val) == 0:
        raise SokdError(f"'{root / 'val'}' holds no images; put images in one sub-folder per class")
    remap = [train.class_to_idx[c] for c in val.classes]   # val may lack some classes
    val.samples = [(p, remap[t]) for p, t in val.samples]
    val.imgs = val.samples
    val.targets = [t for _, t in val.samples]
    val.classes, val.class_to_idx = list(train.classes), dict(train.class_to_idx)
    return train, val
