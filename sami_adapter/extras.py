"""The optional dependencies: which extra of ``pyproject.toml`` installs each, and the import that says so.

The core install (``pip install sami-adapter``) runs the pipeline, the encoder, training and Hub
loading. What needs more imports it where it is used, through :func:`import_extra`, so a missing
package is reported with the command that installs it instead of a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level module -> (the distribution to install, the extra that brings it)
EXTRAS = {
    "sklearn": ("scikit-learn", "eval"),
    "scipy": ("scipy", "eval"),  # comes with scikit-learn
    "matplotlib": ("matplotlib", "eval"),
    "datasets": ("datasets", "train"),
    "tensorboard": ("tensorboard", "train"),
    "gradio": ("gradio", "app"),
}


def missing_extra_message(module: str, needed_for: str) -> str:
    """The sentence that names the package ``needed_for`` lacks and the extra that installs it."""
    package, extra = EXTRAS[module.split(".")[0]]
    return f"{needed_for} needs {package}, which the core install leaves out: pip install \"sami-adapter[{extra}]\" (or pip install {package})."


def import_extra(module: str, needed_for: str) -> ModuleType:
    """``importlib.import_module(module)`` for an optional dependency (a key of :data:`EXTRAS`, or a submodule of one).

    Args:
        module: e.g. ``"sklearn.metrics"`` or ``"matplotlib"``.
        needed_for: what the caller is doing, for the message (e.g. ``"The disentanglement metrics"``).

    Raises:
        ImportError: the package is not installed; the message names the extra that installs it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name is None or e.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there but something it imports is broken: its own error says what
        raise ImportError(missing_extra_message(module, needed_for), name=e.name) from e
