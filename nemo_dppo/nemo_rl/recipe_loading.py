"""Load a NeMo-RL-format recipe the way NeMo-RL does, without NeMo-RL: `defaults:` inheritance + Hydra overrides.

Same semantics as NeMo-RL's `nemo_rl.utils.config` (v0.5–main):

- `defaults:` is a path or a list of paths, relative to the file that names them (or absolute); parents load
  recursively, merge in order, then the file itself merges on top.
- a section carrying `_override_: true` replaces the inherited section instead of merging into it.
- overrides use Hydra's grammar and apply to a struct-mode config: `key=value` changes an existing key,
  `+key=value` adds one, `++key=value` adds or changes, `~key` deletes.
- interpolations may use the resolvers NeMo-RL registers: `${mul:a,b}`, `${div:a,b}`, `${max:a,b}`.

Errors are `RecipeLoadError` with a one-line message (an unknown override key names the closest valid key).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_dppo.nemo_rl.key_errors import unknown_key_message
from nemo_dppo.nemo_rl.schema import LEAF, OPEN, RECIPE

_RESOLVERS = {"mul": lambda a, b: a * b, "div": lambda a, b: a / b, "max": lambda a, b: max(a, b)}


class RecipeLoadError(ValueError):
    """A recipe file or override that cannot be loaded; the message is one line."""


def register_resolvers() -> None:
    """Register NeMo-RL's OmegaConf resolvers (no-op for those already registered)."""
    for name, fn in _RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The merged recipe at `path` with `overrides` applied (interpolations left unresolved, like NeMo-RL)."""
    register_resolvers()
    config = _load_with_defaults(Path(path), chain=())
    if overrides:
        apply_overrides(config, overrides)
    return config


def to_plain(config: DictConfig) -> dict[str, Any]:
    """Resolve interpolations and return plain containers (what NeMo-RL hands `MasterConfig`)."""
    try:
        plain = OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as error:
        raise RecipeLoadError(f"cannot resolve an interpolation: {_first_line(error)}") from None
    assert isinstance(plain, dict)
    return plain


def apply_overrides(config: DictConfig, overrides: Sequence[str]) -> None:
    """Apply Hydra-grammar overrides in struct mode, as NeMo-RL's `parse_hydra_overrides` does."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    OmegaConf.set_struct(config, True)
    try:
        for line in overrides:
            try:
                parsed = parser.parse_overrides(overrides=[line])
            except Exception as error:  # hydra raises its own OverrideParseException
                raise RecipeLoadError(f"override {line!r}: {_first_line(error)}") from None
            try:
                ConfigLoaderImpl._apply_overrides_to_config(overrides=parsed, cfg=config)
            except Exception:
                raise RecipeLoadError(_explain_failed_override(config, parsed[0].key_or_group, line)) from None
    finally:
        OmegaConf.set_struct(config, False)


def _explain_failed_override(config: DictConfig, key: str, line: str) -> str:
    """Why `key` could not be overridden: unknown to the schema (with the closest key) or valid but absent."""
    parts = key.split(".")
    schema: Any = RECIPE
    for depth, part in enumerate(parts):
        if not isinstance(schema, dict):
            break
        if part not in schema:
            return f"override {line}: " + unknown_key_message(".".join(parts[:depth]), part, schema)
        schema = schema[part]
    known = schema in (LEAF, OPEN) or isinstance(schema, dict)
    if known and OmegaConf.select(config, key, throw_on_missing=False) is None and not line.startswith("+"):
        return f"override {line}: '{key}' is not in this recipe; add it with +{line}"
    return f"override {line}: cannot apply it to the recipe"


def _load_with_defaults(path: Path, chain: tuple[Path, ...]) -> DictConfig:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(p.name for p in (*chain, resolved))
        raise RecipeLoadError(f"{path}: defaults form a cycle ({cycle})")
    if not path.is_file():
        raise RecipeLoadError(f"{path}: no such recipe file")
    try:
        config = OmegaConf.load(path)
    except Exception as error:
        raise RecipeLoadError(f"{path}: not valid YAML ({_first_line(error)})") from None
    if not isinstance(config, DictConfig):
        raise RecipeLoadError(f"{path}: a recipe must be a mapping at the top level")
    if "defaults" not in config:
        return config
    defaults = config.pop("defaults")
    names = [str(d) for d in defaults] if isinstance(defaults, ListConfig) else [str(defaults)]
    merged = OmegaConf.create({})
    for name in names:
        parent_path = Path(name) if name.startswith("/") else path.parent / name
        merged = _merge_with_override(merged, _load_with_defaults(parent_path, (*chain, resolved)))
    return _merge_with_override(merged, config)


def _merge_with_override(base: DictConfig, override: DictConfig) -> DictConfig:
    """OmegaConf merge, except that a section marked `_override_: true` replaces the base's section."""
    for key in list(override.keys()):
        section = override[key]
        if isinstance(section, DictConfig) and section.get("_override_", False):
            section.pop("_override_")
            if key in base:
                base.pop(key)
    merged = OmegaConf.merge(base, override)
    assert isinstance(merged, DictConfig)
    return merged


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
