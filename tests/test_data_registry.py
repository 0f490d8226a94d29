"""The data registry: built-in data sets are entries like users' (found by name, with a declared
kind that `create` dispatches on), names are never replaced silently, and the data layer's
modules import one another without a circle."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import sokd
from sokd import data
from sokd.data import registry
from sokd.data.config import DataConfig
from sokd.data.folders import find_image_folder
from sokd.errors import SokdError
from sokd.registry import Registry

DATA_DIR = Path(data.__file__).resolve().parent

BUILTINS = {"fashion_mnist": registry.ARRAYS, "cifar10": registry.ARRAYS, "cifar100": registry.ARRAYS,
            "imagefolder": registry.FOLDER, "imagenet": registry.FOLDER, "synthetic": registry.ARRAYS,
            "hf": registry.ARRAYS}


@pytest.fixture
def restore():
    """Entries a test adds or replaces are put back afterwards."""
    before = dict(registry._READERS)
    yield
    registry._READERS.clear()
    registry._READERS.update(before)


def tiny_arrays(root=None, n: int = 8):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)
    return {"train": (x, np.arange(n) % 2), "test": (x[:4], np.arange(4) % 2)}


# ------------------------------------------------------------------------------------- built-ins

def test_every_builtin_is_a_registry_entry_with_its_declared_kind():
    assert registry.builtin() == tuple(BUILTINS)
    assert data.list_datasets()[:len(BUILTINS)] == list(BUILTINS)
    for name, kind in BUILTINS.items():
        entry = registry.find(name)
        assert (entry.name, entry.kind, entry.reads_config) == (name, kind, True)
        assert entry.kind in registry.KINDS
    assert isinstance(registry._READERS, Registry) and registry._READERS.kind == "data set"
    cifar = registry.find("cifar10")
    assert data.STATS["cifar10"] == (cifar.mean, cifar.std) == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert "synthetic" not in data.STATS and "hf" not in data.STATS


def test_create_dispatches_on_the_declared_kind_not_the_name(restore, tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")

    @sokd.data.register("my_folder", kind=registry.FOLDER, reads_config=True)
    def my_folder(cfg):
        return find_image_folder("imagefolder", cfg.root, cfg.val)

    b = data.create(DataConfig(name="my_folder", root=str(tmp_path), batch_size=2, in_memory=False, num_workers=0))
    assert isinstance(b.train, data.LoaderBatches) and (b.train_size, b.num_classes) == (4, 2)
    assert (b.mean, b.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))   # declares no statistics of its own

    sokd.data.register("my_arrays")(tiny_arrays)
    b = data.create(DataConfig(name="my_arrays", batch_size=2))
    assert isinstance(b.train, data.TensorBatches) and b.train_size == 8


def test_kinds_and_statistics_are_checked_when_registering():
    with pytest.raises(SokdError, match="kind must be one of arrays, folder, got 'stream'"):
        sokd.data.register("x", kind="stream")
    with pytest.raises(SokdError, match="pass reads_config=True"):
        sokd.data.register("x", kind=registry.FOLDER)
    with pytest.raises(SokdError, match="give mean and std together"):
        sokd.data.register("x", mean=(0.5,))
    with pytest.raises(SokdError, match="must decorate a callable"):
        sokd.data.register("x")(3)
    assert "x" not in data.list_datasets()


# ------------------------------------------------------------------------------------ duplicates

@pytest.mark.parametrize("name", list(BUILTINS))
def test_a_builtin_name_is_refused_in_one_line(restore, name):
    original = registry.find(name)
    with pytest.raises(SokdError, match=f"data set '{name}' is built in; register yours under another name") as err:
        sokd.data.register(name)
    assert "\n" not in str(err.value)
    assert registry.find(name) is original


def test_a_builtin_is_replaced_only_with_overwrite(restore):
    sokd.data.register("cifar10", overwrite=True)(tiny_arrays)
    entry = registry.find("cifar10")
    assert (entry.fn, entry.kind, entry.reads_config, entry.mean) == (tiny_arrays, registry.ARRAYS, False, None)
    b = data.create(DataConfig(name="cifar10", batch_size=2))
    assert b.train_size == 8 and b.mean == (0.5, 0.5, 0.5)    # the replacement's statistics, not CIFAR's
    assert data.list_datasets()[:len(BUILTINS)] == list(BUILTINS)
    with pytest.raises(SokdError, match="is built in"):     # still a built-in name
        sokd.data.register("cifar10")


def test_a_user_name_is_refused_in_one_line_unless_overwrite(restore):
    def other(root=None):
        return tiny_arrays(root, 6)

    assert sokd.data.register("mine")(tiny_arrays) is tiny_arrays
    assert sokd.data.register("mine")(tiny_arrays) is tiny_arrays    # the same function again: a no-op
    with pytest.raises(SokdError) as err:
        sokd.data.register("mine")(other)
    assert str(err.value) == "data set 'mine' is already registered; pick another name or pass overwrite=True"
    assert registry.find("mine").fn is tiny_arrays
    sokd.data.register("mine", overwrite=True)(other)
    assert registry.find("mine").fn is other
    assert data.create(DataConfig(name="mine", batch_size=2)).train_size == 6


def test_the_rule_is_the_one_models_follow():
    name = "registry_rule_probe"

    def make(num_classes, in_channels=3):
        raise AssertionError("never built")

    sokd.models.register(name)(make)
    try:
        with pytest.raises(SokdError) as models_err:
            sokd.models.register(name)(lambda num_classes, in_channels=3: None)
    finally:
        from sokd.models.registry import _REGISTRY
        _REGISTRY.pop(name)
    assert str(models_err.value) == f"model '{name}' is already registered; pick another name or pass overwrite=True"


# ---------------------------------------------------------------------------------- import graph

def data_imports(path: Path, modules: set[str]) -> set[str]:
    """The sokd.data modules `path` imports, at any depth (function-level imports included);
    a name imported from the package itself (`from . import create`) is the face, "__init__"."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                parts = node.module.split(".") if node.module else []
            elif node.level == 0 and node.module and node.module.split(".")[:2] == ["sokd", "data"]:
                parts = node.module.split(".")[2:]
            else:
                continue
            if parts:
                found.add(parts[0] if parts[0] in modules else "__init__")
            else:
                found.update(a.name if a.name in modules else "__init__" for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[:2] == ["sokd", "data"]:
                    found.add(parts[2] if len(parts) > 2 and parts[2] in modules else "__init__")
    return found


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (module -> modules it imports) as a path, or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state:
                circle = visit(t)
                if circle:
                    return circle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            circle = visit(m)
            if circle:
                return circle
    return None


def test_no_import_circle_within_the_data_layer():
    files = sorted(DATA_DIR.glob("*.py"))
    modules = {p.stem for p in files}
    graph = {p.stem: data_imports(p, modules) - {p.stem} for p in files}
    assert graph["config"] == {"registry"}            # config reads the registry, never the reverse
    assert "config" not in graph["registry"]
    assert not any("__init__" in targets for m, targets in graph.items() if m != "__init__")
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_circle_finder_sees_function_level_imports(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import y\n")
    modules = {"a", "b"}
    graph = {m: data_imports(tmp_path / f"{m}.py", modules) for m in modules}
    assert find_circle(graph) == ["a", "b", "a"]
