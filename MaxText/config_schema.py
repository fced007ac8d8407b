"""The key declarations moved to MaxText/config/ (one module per component); this name stays for its importers."""

from MaxText.config import MESH_AXES, SCHEMA
from MaxText.config.declare import ConfigError, Field

__all__ = ["ConfigError", "Field", "MESH_AXES", "SCHEMA"]
