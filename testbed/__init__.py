"""moe-testbed: a compact Mixture-of-Experts transformer for studying routing and expert specialization."""

from pathlib import Path

__version__ = "0.1.0"

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The checkout root (editable install): holds conf/ and the shipped data/."""

CONF_DIR = str(PROJECT_ROOT / "conf")
"""Hydra's config directory (config groups: model, router, balance, data, trainer, ...)."""
