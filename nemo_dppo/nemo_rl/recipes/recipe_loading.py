"""Load a NeMo-RL-format recipe the way NeMo-RL does, without NeMo-RL: `defaults:` inheritance + Hydra overrides.

Same semantics as NeMo-RL's `nemo_rl.utils.config` (v0.5–main); the file part is `nemo_dppo.config.load_yaml`:

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

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_dppo.config import ConfigError, load_yaml
from nemo_dppo.nemo_rl.key_errors import unknown_key_message
from nemo_dppo.nemo_rl.recipes.schema import LEAF, OPEN, RECIPE

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
    try:
        config = load_yaml(Path(path))  # the package's one loader: `defaults:`, `_override_`, one-line errors
    except ConfigError as error:
        raise RecipeLoadError(str(error)) from None
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
