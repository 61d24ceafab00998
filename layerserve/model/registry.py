"""Registry of model families: architecture name -> model class."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class ModelRegistry:
    """Maps `ModelConfig.architecture` to a class. Families register with `@registry.register(...)`."""

    _classes: dict[str, type] = field(default_factory=dict)

    def register(self, *names: str) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            for name in names:
                self._classes[name] = cls
            return cls

        return deco

    def resolve(self, architecture: str) -> type:
        try:
            return self._classes[architecture]
        except KeyError:
            known = ", ".join(self.names())
            raise ValueError(f"unsupported architecture {architecture!r} (supported: {known})") from None

    def names(self) -> list[str]:
        return sorted(self._classes)


# The one registry instance is immutable in use: filled at import by the family modules below.
MODELS = ModelRegistry()
