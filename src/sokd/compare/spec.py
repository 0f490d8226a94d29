"""A comparison spec: a base config, the variants (each a set of overrides), the seeds and the
teacher recipe, and what every run of the grid is made of.

    name: my-pair
    config: base.yaml          # a run config (path relative to this file) or a mapping; it gives
                               # the data, optimiser, schedule and the `student:` network
    seeds: [0, 1, 2]
    teacher: {arch: wrn_16_2, config: {train: {epochs: 30}}}   # one teacher per seed, trained once
                                                                # (kwargs: its constructor options)
    baseline: kd               # paired differences are taken against this variant
    variants:
      vanilla: {method: {name: vanilla}}
      kd: {method: {name: kd}}
      sokd: {method: {name: sokd}}

A variant's run config is the base config with the variant's overrides merged on top; the
network roles it does not set come from the spec: a role that must come trained is the seed's
teacher (its model.pt), a teacher-like role is the teacher's architecture, every other role the
base config's `student`.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import methods
from ..config import _deep_merge, apply_overrides, build, read_yaml
from ..errors import SokdError
from ..validation import validate

#: sections of a run config that hold networks (a plugin's roles are added by its method)
NETWORK_SECTIONS = ("model", "teacher", "student", "peers")
TEACHER_RUN = "teacher"
PRESETS = Path(__file__).resolve().parent.parent / "presets" / "compare"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class TeacherRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arch: str = Field(min_length=1, description="the teacher's architecture (a `sokd models` name)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="its constructor options (e.g. a ViT's "
                                   "img_size, patch_size, stages)")
    config: dict[str, Any] = Field(default_factory=dict, description="overrides of the base config for the "
                                                                    "teacher's own training run")


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    config: str | dict[str, Any]
    seeds: list[int] = Field(min_length=1)
    teacher: TeacherRecipe | None = None
    baseline: str
    variants: dict[str, dict[str, Any]] = Field(min_length=1)
    out: str | None = Field(None, description="where the runs go (default runs/compare/<name>)")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct (a repeated seed would count one run twice)")
        return seeds

    @field_validator("variants")
    @classmethod
    def _names(cls, variants: dict) -> dict:
        for name in variants:
            if not _NAME.match(name) or name == TEACHER_RUN:
                raise ValueError(f"variant name '{name}' must be letters, digits and _.+- (and not "
                                 f"'{TEACHER_RUN}', the name of the seeds' teacher runs)")
        return variants

    @model_validator(mode="after")
    def _baseline_is_a_variant(self):
        if self.baseline not in self.variants:
            raise ValueError(f"baseline '{self.baseline}' is not one of the variants ({', '.join(self.variants)})")
        return self


class Grid:
    """The runs of a spec: one teacher per seed (when a variant needs one), then every variant ×
    seed, with their directories under `out` and their configs."""

    def __init__(self, spec: Spec, base: dict, source: Path | None, out: Path, overrides=()):
        self.spec, self.source, self.out = spec, source, out
        self.selected: set[str] | None = None   # `select`: the variants to run (None: all)
        self.selected_seeds: set[int] | None = None   # `select_seeds`: the seeds to run (None: all)
        self.base = apply_overrides(base, list(overrides))
        if "student" not in self.base:
            raise SokdError(f"compare spec '{spec.name}': its config has no `student:` section; add "
                            f"student: {{arch: NAME}} (the network every variant trains)")
        self.needs_teacher = [v for v in spec.variants if methods.needs_trained_teacher(self._method(v))]
        if self.needs_teacher and spec.teacher is None:
            raise SokdError(f"compare spec '{spec.name}': variant '{self.needs_teacher[0]}' distils from a trained "
                            f"teacher; add teacher: {{arch: NAME}} (trained once per seed)")

    def _method(self, variant: str) -> str:
        tree = _deep_merge(self.base, self.spec.variants[variant])
        name = (tree.get("method") or {}).get("name")
        if not name:
            raise SokdError(f"compare spec '{self.spec.name}': variant '{variant}' names no method; "
                            f"set method: {{name: ...}} in it or in the config")
        return name

    # -- the runs ----------------------------------------------------------------------------
    def runs(self) -> list[tuple[str, int]]:
        """(run name, seed) in the order workers take them: seed by seed, each seed's teacher
        first, so a grid cut short holds whole seeds (every variant paired); a worker that finds
        a seed's variants waiting on a teacher another worker trains moves on to the next seed."""
        variants = [v for v in self.spec.variants if self.selected is None or v in self.selected]
        teacher = any(v in self.needs_teacher for v in variants)
        out = []
        for s in self.spec.seeds:
            if self.selected_seeds is not None and s not in self.selected_seeds:
                continue
            out += [(TEACHER_RUN, s)] if teacher else []
            out += [(v, s) for v in variants]
        return out

    def select(self, names: list[str]) -> None:
        """Run only the variants `names` (`--variants`); the table still reads every variant."""
        unknown = [n for n in names if n not in self.spec.variants]
        if unknown or not names:
            raise SokdError(f"--variants names {', '.join(unknown) or 'nothing'}, which is not a variant of "
                            f"compare spec '{self.spec.name}'; its variants: {', '.join(self.spec.variants)}")
        self.selected = set(names)

    def select_seeds(self, seeds: list[int]) -> None:
        """Run only these seeds (`--seeds`), e.g. one seed of every variant before the others."""
        unknown = [s for s in seeds if s not in self.spec.seeds]
        if unknown or not seeds:
            raise SokdError(f"--seeds names {', '.join(map(str, unknown)) or 'nothing'}, which is not a seed of "
                            f"compare spec '{self.spec.name}'; its seeds: {', '.join(map(str, self.spec.seeds))}")
        self.selected_seeds = set(seeds)

    def run_dir(self, name: str, seed: int) -> Path:
        return self.out / f"{name}-s{seed}"

    def depends_on(self, name: str, seed: int) -> tuple[str, int] | None:
        if name != TEACHER_RUN and name in self.needs_teacher:
            return TEACHER_RUN, seed
        return None

    def teacher_model(self, seed: int) -> Path:
        return self.run_dir(TEACHER_RUN, seed) / "model.pt"

    def config(self, name: str, seed: int) -> dict:
        """The full run config of (name, seed), validated."""
        if name == TEACHER_RUN:
            tree = _deep_merge(self.base, self.spec.teacher.config)
            tree["method"] = {"name": "vanilla"}
            tree["model"] = {**(tree.get("model") or {}), "arch": self.spec.teacher.arch,
                             **({"kwargs": dict(self.spec.teacher.kwargs)} if self.spec.teacher.kwargs else {})}
            given = {"model"}
        else:
            overrides = self.spec.variants[name]
            tree = _deep_merge(self.base, overrides)
            given = {k for k in overrides if k in NETWORK_SECTIONS or k not in self.base}
        method = tree["method"]["name"]
        roles = methods.config_roles(method)
        student = copy.deepcopy(self.base["student"])
        for role in roles:
            if role in given:
                continue
            decl = methods.role(method, role)
            teacher_kwargs = ({"kwargs": dict(self.spec.teacher.kwargs)}
                              if self.spec.teacher is not None and self.spec.teacher.kwargs else {})
            if decl.trained:
                spec = {"arch": self.spec.teacher.arch, "checkpoint": str(self.teacher_model(seed)), **teacher_kwargs}
            elif decl.like == "teacher" and self.spec.teacher is not None:
                spec = {"arch": self.spec.teacher.arch, **teacher_kwargs}
            else:
                spec = student
            tree[role] = [copy.deepcopy(spec)] if decl.many else copy.deepcopy(spec)
        for section in NETWORK_SECTIONS:
            if section in tree and section not in roles:
                del tree[section]
        tree["name"] = name
        tree["train"] = {**(tree.get("train") or {}), "seed": seed}
        run_dir = self.run_dir(name, seed)
        tree["output"] = {**(tree.get("output") or {}), "dir": str(run_dir), "progress": False,
                          "resume": (run_dir / "last.pt").exists(), "overwrite": False}
        build(tree)   # refuses a bad variant before any run starts
        return tree


def _read_spec(text_source: str, path: Path | None) -> dict:
    try:
        tree = yaml.safe_load(text_source) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise SokdError(f"compare spec '{path}' is not valid YAML"
                        + (f" at line {mark.line + 1}" if mark else "") + "; fix the syntax") from None
    if not isinstance(tree, dict):
        raise SokdError(f"compare spec '{path}' must be a mapping (name, config, seeds, teacher, baseline, variants)")
    return tree


def resolve_source(text: str) -> Path:
    """SPEC as given on the command line: a file, or `preset:NAME` for a packaged spec."""
    if text.startswith("preset:"):
        name = text.split(":", 1)[1]
        path = PRESETS / f"{name}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
            raise SokdError(f"no compare preset '{name}'; the presets are: {known}")
        return path
    path = Path(text).expanduser()
    if not path.is_file():
        raise SokdError(f"compare spec '{text}' not found; pass a YAML file or preset:NAME")
    return path


def load(text: str, overrides=(), out: str | None = None) -> Grid:
    """The grid of the spec at `text` (a path or preset:NAME), with `key=value` overrides of its
    base config and, optionally, another output folder."""
    path = resolve_source(text)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SokdError(f"cannot read compare spec '{path}' ({err}); check the file") from None
    try:
        spec = validate(Spec, _read_spec(raw, path))
    except SokdError as err:
        raise SokdError(f"compare spec '{path}': {err}") from None
    if isinstance(spec.config, str):
        base = read_yaml(path.parent / spec.config)
    else:
        base = copy.deepcopy(spec.config)
    folder = Path(out or spec.out or f"runs/compare/{spec.name}").expanduser()
    return Grid(spec, base, path, folder, overrides)
