"""Packaged configs: `configs/` at the repository root is a link to this folder.

`resolve_config_path("demo")` finds `demo.yaml` here; a path to an existing file is returned as is.
"""

from __future__ import annotations

from pathlib import Path

from sgsd.errors import ConfigError

CONFIG_DIR = Path(__file__).parent


def available_configs() -> list[str]:
    """The training configs (accelerate/ holds Accelerate launcher configs, not training configs)."""
    return sorted(
        str(p.relative_to(CONFIG_DIR).with_suffix(""))
        for p in CONFIG_DIR.rglob("*.yaml")
        if p.relative_to(CONFIG_DIR).parts[0] != "accelerate"
    )


def resolve_config_path(name_or_path: str | None) -> Path | None:
    if name_or_path is None:
        return None
    p = Path(name_or_path)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    if p.suffix in (".yaml", ".yml") or "/" in name_or_path:
        raise ConfigError(f"config file not found: {name_or_path}")
    raise ConfigError(f"unknown config '{name_or_path}'; packaged configs: {', '.join(available_configs())}")
