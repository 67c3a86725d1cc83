"""Configuration errors: each one names the file, the key path, the line and what was expected."""

from __future__ import annotations


class ConfigError(Exception):
    """One configuration problem, rendered as ``FILE:LINE: KEYPATH: MESSAGE``.

    ``line`` is 1-based, or None when no line applies (an unreadable file); the rendering then
    drops it: ``FILE: KEYPATH: MESSAGE``.
    """

    def __init__(self, file: str, path: str, line: int | None, message: str) -> None:
        super().__init__(file, path, line, message)
        self.file = file
        self.path = path
        self.line = line
        self.message = message

    @property
    def errors(self) -> list[ConfigError]:
        """Every problem this exception stands for (here: itself)."""
        return [self]

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.path}: {self.message}"
        return f"{self.file}:{self.line}: {self.path}: {self.message}"

    def __reduce__(self) -> tuple[type, tuple[str, str, int | None, str]]:
        return (type(self), (self.file, self.path, self.line, self.message))


class ConfigErrors(ConfigError):
    """Several problems found at once; ``errors`` lists them in file and line order.

    The scalar attributes (``file``, ``path``, ``line``, ``message``) are those of the first
    error; ``str()`` gives one line per error.
    """

    def __init__(self, errors: list[ConfigError]) -> None:
        if not errors:
            raise ValueError("ConfigErrors needs at least one error")
        first = errors[0]
        super().__init__(first.file, first.path, first.line, first.message)
        self._errors = list(errors)

    @property
    def errors(self) -> list[ConfigError]:
        return list(self._errors)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self._errors)

    def __reduce__(self) -> tuple[type, tuple[list[ConfigError]]]:  # type: ignore[override]
        return (type(self), (self._errors,))


def raise_errors(errors: list[ConfigError]) -> None:
    """Raise nothing for no errors, the error itself for one, ConfigErrors for several."""
    if not errors:
        return
    if len(errors) == 1:
        raise errors[0]
    raise ConfigErrors(errors)
