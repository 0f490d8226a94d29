"""Image folders (`imagefolder`, `imagenet`): train/ and test/ (or val/, validation/) trees read by
torchvision's ImageFolder.

Every image goes through `read_image`, so one that cannot be opened or decoded is an
`UnreadableImage` naming its file (LoaderBatches stops the run with it, or skips the file).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import SokdError
from .paths import search_roots
from .registry import FOLDER, register
from .sources import UnreadableImage

IMAGENET_DEFAULTS = ("data/imagenet", "~/.cache/sokd/imagenet", "/usr/share/datasets/imagenet")
#: ImageNet's per-channel statistics, also the defaults of any image folder (photos, like ImageNet's)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


TEST_NAMES = ("test", "val", "validation")     # the first one present is the test split
VAL_NAMES = ("val", "validation")               # beside test/, a shipped validation split


@dataclass
class FolderLayout:
    """Where an image-folder data set keeps its splits."""

    root: Path
    train: Path
    test: Path
    val: Path | None          # validation folder (model selection), when the data set has one


def find_image_folder(name: str, root: str | None, val: str | None = None) -> FolderLayout:
    """The data set's layout: train/ plus test/, val/ or validation/ (the first present is the
    test split). With test/ present, a val/ or validation/ beside it, or `val` when given, is the
    validation split."""
    if root is None and name == "imagefolder":
        raise SokdError("data.root is required for imagefolder: a directory with train/ and test/ (or val/) "
                        "class sub-folders (torchvision ImageFolder layout)")
    for cand in search_roots(root, IMAGENET_DEFAULTS):
        test = next((cand / t for t in TEST_NAMES if (cand / t).is_dir()), None)
        if (cand / "train").is_dir() and test is not None:
            return FolderLayout(cand, cand / "train", test, _validation(cand, test, val))
    if root is None:
        raise SokdError(f"ImageNet not found (looked in {', '.join(IMAGENET_DEFAULTS)}); set data.root to a "
                        f"directory with train/ and val/ class sub-folders")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise SokdError(f"data.root '{path}' is not a directory; point it at a folder with train/ and test/ (or val/)")
    missing = "train/" if not (path / "train").is_dir() else "test/, val/ or validation/"
    raise SokdError(f"data.root '{path}' has no {missing} folder; an image folder data set needs train/ and "
                    f"test/ (or val/, validation/), each with one sub-folder per class")


def _validation(root: Path, test: Path, val: str | None) -> Path | None:
    if val is not None:
        path = Path(val).expanduser()
        path = path if path.is_absolute() or path.is_dir() else root / val
        if not path.is_dir():
            raise SokdError(f"data.val '{val}' is not a directory; give a folder with one sub-folder per class")
        if path.resolve() == test.resolve():
            raise SokdError(f"data.val '{val}' is the test split itself; selecting on it is selecting on the test set")
        return path
    if test.name != "test":
        return None
    return next((root / v for v in VAL_NAMES if (root / v).is_dir()), None)


def read_image(path: str):
    """The RGB PIL image in `path`; any failure to open or decode it is an UnreadableImage."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as err:  # PIL signals bad data with OSError, SyntaxError, ValueError, ...
        raise UnreadableImage(path, " ".join(str(err).split()) or type(err).__name__) from err


def image_folders(layout: FolderLayout, train_transform, eval_transform):
    """(train, test, val or None) torchvision ImageFolders; test's and val's labels use train's
    class -> index mapping."""
    from torchvision.datasets import ImageFolder

    def build(path: Path, transform, allow_empty: bool):
        try:
            return ImageFolder(str(path), transform=transform, loader=read_image, allow_empty=allow_empty)
        except FileNotFoundError as err:
            raise SokdError(f"'{path}': {err}; put images (.png, .jpg, ...) in one sub-folder per class") from None

    check_separate_folders(layout)
    train = build(layout.train, train_transform, False)
    held = [_aligned(build(path, eval_transform, True), train, path) if path is not None else None
            for path in (layout.test, layout.val)]
    check_separate_files([(layout.train, train), (layout.test, held[0]), (layout.val, held[1])])
    return train, held[0], held[1]


#: up to this many images in all splits, shared files are found by (device, inode) of every file
#: (symbolic and hard links); above it, by resolved class folder and file name (no per-file stat)
PER_FILE_CHECK_LIMIT = 300_000


def check_separate_folders(layout: FolderLayout) -> None:
    """Refuse splits that are one folder (a symbolic link, data.val=PATH at train/ or test/):
    accuracy on them would not be held-out accuracy."""
    splits = [(role, p) for role, p in (("training", layout.train), ("test", layout.test),
                                        ("validation", layout.val)) if p is not None]
    for i, (role_a, a) in enumerate(splits):
        for role_b, b in splits[i + 1:]:
            if a.resolve() == b.resolve():
                raise SokdError(f"the {role_a} folder '{a}' and the {role_b} folder '{b}' are the same folder "
                                f"({a.resolve()}); give each split its own images (for model selection, "
                                f"data.val_split=0.1 holds out part of train/)")


def check_separate_files(splits) -> None:
    """Refuse two splits that share image files (links to one file, or class folders resolving to
    one place); `splits` holds (folder, ImageFolder or None) pairs: training, test, validation."""
    roles = ("training", "test", "validation")
    present = [(role, path, ds) for role, (path, ds) in zip(roles, splits) if ds is not None]
    per_file = sum(len(ds.samples) for _, _, ds in present) <= PER_FILE_CHECK_LIMIT
    resolved_dirs: dict[str, str] = {}

    def identity(file: str):
        if per_file:
            try:
                st = os.stat(file)
            except OSError:  # gone or unreadable: the reader reports it, naming the file
                return "unreadable", file
            return st.st_dev, st.st_ino
        parent, name = os.path.split(file)
        if parent not in resolved_dirs:
            resolved_dirs[parent] = os.path.realpath(parent)
        return resolved_dirs[parent], name

    seen: list[tuple[str, Path, dict]] = []
    for role, path, ds in present:
        ids = {identity(f): f for f, _ in ds.samples}
        for other_role, other_path, other_ids in seen:
            shared = ids.keys() & other_ids.keys()
            if shared:
                one = min(shared, key=lambda i: ids[i])
                raise SokdError(f"the {other_role} folder '{other_path}' and the {role} folder '{path}' share "
                                f"{len(shared)} image file(s) (e.g. '{ids[one]}' is '{other_ids[one]}'); give "
                                f"each split its own images")
        seen.append((role, path, ids))


def _aligned(split, train, path: Path):
    """`split` relabelled with train's class indices (it may lack some classes, never add one)."""
    extra = [c for c in split.classes if c not in train.class_to_idx]
    if extra:
        raise SokdError(f"'{path}' has class folders not in train/: {', '.join(extra[:5])}; "
                        f"train/ and {path.name}/ need the same class names")
    if len(split) == 0:
        raise SokdError(f"'{path}' holds no images; put images in one sub-folder per class")
    remap = [train.class_to_idx[c] for c in split.classes]
    split.samples = [(p, remap[t]) for p, t in split.samples]
    split.imgs = split.samples
    split.targets = [t for _, t in split.samples]
    split.classes, split.class_to_idx = list(train.classes), dict(train.class_to_idx)
    return split


@register("imagefolder", kind=FOLDER, reads_config=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)
def read_imagefolder(cfg) -> FolderLayout:
    """The `imagefolder` entry: the train/ and test/ (val/, validation/) trees under data.root."""
    return find_image_folder("imagefolder", cfg.root, cfg.val)


@register("imagenet", kind=FOLDER, reads_config=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)
def read_imagenet(cfg) -> FolderLayout:
    """The `imagenet` entry: like `imagefolder`, also looked for in IMAGENET_DEFAULTS without data.root."""
    return find_image_folder("imagenet", cfg.root, cfg.val)
