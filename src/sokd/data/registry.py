"""Every data set sokd can load, by name: the built-in ones and users' (`@sokd.data.register`).

Built-in readers register themselves in their own modules (`idx`, `cifar`, `folders`,
`synthetic`, `hf`) through the same `register` users get, so nothing else in sokd keeps a list of
data set names. Each entry declares its kind, and `sokd.data.create` builds what that kind calls
for, never looking at the name:

* `ARRAYS` ("arrays"): `entry.read(cfg)` gives both splits as in-memory uint8 tensors
  (`ArraySplits`); they take the fast path (`sokd.data.in_memory`): tensors on the training
  device, augmented there in batches.
* `FOLDER` ("folder"): `entry.read(cfg)` gives an image-folder layout (`folders.FolderLayout`);
  `sokd.data.folder_pipeline` decodes it into memory when small, else streams it through
  DataLoader workers.

A user's reader is called as `fn(root=data.root, **data.options)` and returns both splits, in any
of these forms (see `sokd.data.plugin`): a mapping or tuple with `train` and `test`, each a pair
(uint8 images (N,H,W[,C]) or (N,C,H,W), integer labels) or a torch `Dataset` of (image, label)
with PIL images, uint8 tensors (C,H,W) or uint8 arrays (H,W[,C]); optionally `classes` (names).
The result goes through the same checks as the built-in readers, then the in-memory fast path.
List the module that registers it under `imports:` in a config. Built-in readers read fields of
their own (`data.download`, `data.hf`, `data.synthetic_*`), so they take the whole `DataConfig`
(`reads_config=True`) and may declare the data set's per-channel mean and std.

Names follow one rule with models and methods (`sokd.registry.Registry`): registering a name that
exists is refused in one line unless `overwrite=True`, so a plugin can never silently replace a
built-in or another plugin's reader; registering the same function again (a module imported
twice) changes nothing. A built-in's name is refused as soon as `register(name)` is called.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from ..errors import SokdError
from ..registry import Registry
from .plugin import read_with_options

Reader = Callable[..., Any]

ARRAYS = "arrays"   # read(cfg) -> ArraySplits: uint8 tensors held in memory
FOLDER = "folder"   # read(cfg) -> FolderLayout: an image folder, decoded when small, else streamed
KINDS = (ARRAYS, FOLDER)


@dataclass(frozen=True)
class Entry:
    """One registered data set: what it is (`kind`) and how to read it."""

    name: str
    kind: str
    fn: Reader                   # the function as registered
    reads_config: bool = False   # fn(cfg) (built-ins) rather than fn(root=..., **options) (users)
    mean: tuple[float, ...] | None = None   # the data set's own per-channel statistics, in [0, 1]
    std: tuple[float, ...] | None = None    # units; None: the generic defaults

    def read(self, cfg) -> Any:
        """`ArraySplits` (ARRAYS) or a `FolderLayout` (FOLDER) for the data config `cfg`."""
        if self.reads_config:
            return self.fn(cfg)
        return read_with_options(self.name, self.fn, cfg)


_READERS: Registry = Registry("data set")
_BUILTIN: tuple[str, ...] = ()   # names registered while `sokd.data` loaded its own readers


def register(name: str, *, overwrite: bool = False, kind: str = ARRAYS, reads_config: bool = False,
             mean: Sequence[float] | None = None, std: Sequence[float] | None = None
             ) -> Callable[[Reader], Reader]:
    """Decorator adding a data set reader under `name` (usable as `data.name=<name>`).

    A name that is registered already (built in, or by another module) is refused in one line
    unless `overwrite=True`. `kind`, `reads_config`, `mean` and `std` are how the built-in readers
    describe themselves (see the module docstring); a user's reader keeps the defaults.
    """
    if not isinstance(name, str) or not name.strip():
        raise SokdError(f"data set name must be a non-empty string, got {name!r}")
    if name in _BUILTIN and not overwrite:
        raise SokdError(f"data set '{name}' is built in; register yours under another name")
    if kind not in KINDS:
        raise SokdError(f"sokd.data.register('{name}'): kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == FOLDER and not reads_config:
        raise SokdError(f"sokd.data.register('{name}'): a {FOLDER} reader returns a FolderLayout for the data "
                        f"config; pass reads_config=True")
    if (mean is None) != (std is None) or (mean is not None and len(mean) != len(std)):
        raise SokdError(f"sokd.data.register('{name}'): give mean and std together, one value per channel")

    def decorator(fn: Reader) -> Reader:
        if not callable(fn):
            raise SokdError(f"sokd.data.register('{name}') must decorate a callable, got {type(fn).__name__}")
        entry = Entry(name, kind, fn, reads_config, None if mean is None else tuple(float(v) for v in mean),
                      None if std is None else tuple(float(v) for v in std))
        if _READERS.get(name) != entry:   # an equal entry: the same registration again, a no-op
            _READERS.add(name, entry, overwrite)
        return fn

    return decorator


def seal_builtins() -> None:
    """Record the names registered so far as the built-in ones (called once `sokd.data` has
    imported its readers): they are listed first, in registration order, and a user must pass
    `overwrite=True` to replace one."""
    global _BUILTIN
    if not _BUILTIN:
        _BUILTIN = tuple(_READERS)


def names() -> list[str]:
    """Built-in data set names (registration order), then the other registered names, sorted."""
    return [n for n in _BUILTIN if n in _READERS] + sorted(n for n in _READERS if n not in _BUILTIN)


def builtin() -> tuple[str, ...]:
    """The names `sokd.data` registers itself."""
    return _BUILTIN


def find(name: str) -> Entry:
    """The entry registered as `name`; a one-line SokdError when there is none."""
    if name not in _READERS:
        raise SokdError(f"data set '{name}' is not registered; list the module that registers it under imports:")
    return _READERS[name]


class _Statistics(Mapping):
    """name -> (mean, std) of each registered data set that declares its own: a live view of the
    registry, so an entry replaced with `overwrite=True` brings its own statistics (or none)."""

    def __getitem__(self, name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        entry = _READERS.get(name)
        if entry is None or entry.mean is None:
            raise KeyError(name)
        return entry.mean, entry.std

    def __iter__(self) -> Iterator[str]:
        return iter([n for n, e in _READERS.items() if e.mean is not None])

    def __len__(self) -> int:
        return sum(1 for e in _READERS.values() if e.mean is not None)


#: (mean, std) per channel of the training images, in [0, 1] units, of the data sets that declare them
STATS: Mapping = _Statistics()
