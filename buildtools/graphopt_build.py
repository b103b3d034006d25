"""The build backend: setuptools' own (PEP 517/660), with one notice filtered out of editable installs.

graphopt maps two top-level folders into its package (`passes/` → graphopt.passes, `kernels/` →
graphopt.kernels; see [tool.setuptools.package-dir] in pyproject.toml). For such a layout setuptools'
editable install uses an import hook, and says so with an `InformationOnly` notice, "Editable installation.
Please be careful with folders in your working directory with the same name as your package", which recent
pip prints as a warning even under `-q`. The folder it means is `graphopt/` itself, the package; the notice
asks nothing of the user, so `make demo` and `pip install -e .` show it no longer. Everything else —
wheels, sdists, any other warning — is setuptools' unchanged.
"""
from __future__ import annotations

import warnings
from typing import Any

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F401,F403  (the PEP 517 hooks, unchanged)
from setuptools.warnings import InformationOnly


def build_editable(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                   metadata_directory: str | None = None) -> str:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Editable installation", category=InformationOnly)
        return build_meta.build_editable(wheel_directory, config_settings, metadata_directory)
