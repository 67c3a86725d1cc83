"""YAML loader: text -> (data, line of every key path) -> validated frozen model.

The YAML is composed into nodes rather than loaded, so that each key path keeps the line it
came from; duplicate keys are caught on the way. Pydantic's error locations are then mapped
back onto key paths of the data, and every problem becomes one ``FILE:LINE: PATH: MESSAGE``.
"""

from __future__ import annotations

import difflib
import importlib.resources
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .errors import ConfigError, raise_errors
from .models import (
    DEFER_CHECKS,
    KeyPath,
    Problem,
    RunningConfig,
    StartupConfig,
    format_path,
    running_problems,
    startup_problems,
)
from .types import BASE_DIR, describe

M = TypeVar("M", StartupConfig, RunningConfig)

_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAX_NODES = 200_000  # alias bombs: a config never comes near this
_SYNTAX = "(yaml)"


@dataclass
class Document:
    """A parsed YAML file: plain data, the line of each key path, and structural errors."""

    file: str
    data: Any = None
    lines: dict[KeyPath, int] = field(default_factory=dict)
    errors: list[ConfigError] = field(default_factory=list)

    def line_of(self, path: KeyPath) -> int | None:
        """Line of ``path``, else of its nearest ancestor that has one."""
        for n in range(len(path), -1, -1):
            line = self.lines.get(path[:n])
            if line is not None:
                return line
        return None

    def error(self, path: KeyPath, message: str) -> ConfigError:
        return ConfigError(self.file, format_path(path), self.line_of(path), message)


_SPACE_OR_FLOW = "\0 \t\r\n\x85\u2028\u2029,[]{}"


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``[127.0.0.0/8, ::1/128]`` as YAML 1.2 does.

    PyYAML (YAML 1.1) takes every ':' inside ``[...]``/``{...}`` as a key indicator, so an
    IPv6 literal starting with ':' in a flow list is a syntax error there. YAML 1.2 lets a
    plain scalar start with ':' when a non-space, non-flow character follows. Where no key is
    pending that the ':' could belong to (just after '[', ',' or a ': '), we do too.
    """

    def check_value(self) -> bool:
        if (
            self.flow_level
            and self.flow_level not in self.possible_simple_keys
            and self.peek(1) not in _SPACE_OR_FLOW
        ):
            return False
        return bool(super().check_value())

    def check_plain(self) -> bool:
        if self.flow_level and self.peek() == ":" and self.peek(1) not in _SPACE_OR_FLOW:
            return True
        return bool(super().check_plain())


class _Builder:
    """Walks a composed node tree into dicts/lists/scalars, recording lines per key path."""

    def __init__(self, loader: _Loader, doc: Document) -> None:
        self.loader = loader
        self.doc = doc
        self.count = 0
        self.active: set[int] = set()

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        self.count += 1
        if self.count > _MAX_NODES:
            raise _Abort(self.doc.error(path, f"document too large (over {_MAX_NODES} nodes)"))
        if isinstance(node, yaml.ScalarNode):
            return self.loader.construct_object(node, deep=True)
        if id(node) in self.active:
            raise _Abort(self.doc.error(path, "recursive alias"))
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                if node.tag != _SEQ_TAG:
                    raise _Abort(self.doc.error(path, f"unsupported YAML tag {node.tag}"))
                out_list = []
                for i, item in enumerate(node.value):
                    self.doc.lines.setdefault((*path, i), item.start_mark.line + 1)
                    out_list.append(self.build(item, (*path, i)))
                return out_list
            if node.tag != _MAP_TAG:
                raise _Abort(self.doc.error(path, f"unsupported YAML tag {node.tag}"))
            return self._mapping(node, path)
        finally:
            self.active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, Any]:
        explicit = sum(1 for k, _ in node.value if k.tag != _MERGE_TAG)
        if explicit != len(node.value):
            self.loader.flatten_mapping(node)  # merged pairs first, explicit pairs last
        pairs = node.value
        n_merged = len(pairs) - explicit
        out: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for n, (key_node, value_node) in enumerate(pairs):
            key = self.build(key_node, path)
            key_line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                self.doc.errors.append(
                    ConfigError(
                        self.doc.file, format_path(path), key_line,
                        f"keys must be strings, got {describe(key)}",
                    )
                )
                continue
            here = (*path, key)
            if n >= n_merged and key in first_line:
                self.doc.errors.append(
                    ConfigError(
                        self.doc.file, format_path(here), key_line,
                        f"duplicate key {key!r} (first at line {first_line[key]})",
                    )
                )
            if n >= n_merged:
                first_line.setdefault(key, key_line)
            self.doc.lines[here] = key_line
            out[key] = self.build(value_node, here)
        return out


class _Abort(Exception):
    def __init__(self, error: ConfigError) -> None:
        super().__init__(str(error))
        self.error = error


def parse_yaml(text: str, file: str) -> Document:
    """Parse ``text`` into a Document; syntax and structural errors land in ``errors``."""
    doc = Document(file)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            doc.data, doc.lines[()] = {}, 1
            return doc
        doc.lines[()] = node.start_mark.line + 1
        data = _Builder(loader, doc).build(node, ())
        doc.data = {} if data is None else data  # a document of just `~` is empty too
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        message = exc.problem or "invalid YAML"
        if exc.context and message.startswith("but "):
            message = f"{exc.context}, {message}"
        elif exc.context:
            message += f" ({exc.context})"
        if "found ':'" in message:
            message += "; quote values that start with ':', e.g. \"::1\""
        doc.errors.append(ConfigError(file, _SYNTAX, line, message))
        doc.data = None
    except yaml.YAMLError as exc:
        doc.errors.append(ConfigError(file, _SYNTAX, None, str(exc)))
        doc.data = None
    except _Abort as exc:
        doc.errors.append(exc.error)
        doc.data = None
    except RecursionError:
        doc.errors.append(ConfigError(file, _SYNTAX, None, "nesting too deep"))
        doc.data = None
    finally:
        loader.dispose()
    return doc


def _read(path: str | Path) -> tuple[str, str]:
    name = str(path)
    try:
        return Path(path).read_text(encoding="utf-8"), name
    except UnicodeDecodeError as exc:
        raise ConfigError(name, _SYNTAX, None, f"not UTF-8 text: {exc.reason}") from None
    except OSError as exc:
        raise ConfigError(name, "(file)", None, f"cannot read: {exc.strerror or exc}") from None


def _embedded(name: str) -> tuple[str, str]:
    resource = importlib.resources.files("ferrymail") / "defaults" / name
    return resource.read_text(encoding="utf-8"), str(resource)


# ---------------------------------------------------------------------------------------------
# Mapping pydantic errors onto key paths
# ---------------------------------------------------------------------------------------------


def _data_path(loc: tuple[Any, ...], data: Any, missing: bool) -> KeyPath:
    """Key path in ``data`` for a pydantic ``loc``; union tags and the like are skipped."""
    path: list[str | int] = []
    node = data
    for n, part in enumerate(loc):
        if (isinstance(node, dict) and isinstance(part, str) and part in node) or (
            isinstance(node, list)
            and isinstance(part, int)
            and not isinstance(part, bool)
            and 0 <= part < len(node)
        ):
            path.append(part)
            node = node[part]
        elif missing and n == len(loc) - 1 and isinstance(part, str):
            path.append(part)
    return tuple(path)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _model_at(root: type[BaseModel], path: KeyPath) -> type[BaseModel] | None:
    current: type[BaseModel] | None = root
    for part in path:
        if isinstance(part, int):
            continue
        if current is None or part not in current.model_fields:
            return None
        current = _model_in(current.model_fields[part].annotation)
    return current


def _unknown_key(root: type[BaseModel], path: KeyPath) -> str:
    key = str(path[-1]) if path else "?"
    model = _model_at(root, path[:-1])
    if model is None:
        return f"unknown key {key!r}"
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r}{hint} (expected one of: {', '.join(allowed)})"


def _message(err: Any, root: type[BaseModel], path: KeyPath) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "missing":
        return f"missing required key {path[-1]!r}" if path else "missing required key"
    if kind == "extra_forbidden":
        return _unknown_key(root, path)
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "assertion_error":
        return str(ctx.get("error", err["msg"]))
    expected = {
        "int_type": "expected an integer",
        "int_parsing": "expected an integer",
        "bool_type": "expected true or false",
        "bool_parsing": "expected true or false",
        "string_type": "expected a string",
        "model_type": "expected a mapping",
        "model_attributes_type": "expected a mapping",
        "dict_type": "expected a mapping",
        "tuple_type": "expected a list",
        "list_type": "expected a list",
    }.get(kind)
    if expected is None:
        if kind == "literal_error":
            expected = f"expected one of: {ctx.get('expected', '')}".replace("' or '", "', '")
        elif kind == "greater_than_equal":
            expected = f"expected a value >= {ctx.get('ge')}"
        elif kind == "less_than_equal":
            expected = f"expected a value <= {ctx.get('le')}"
        elif kind == "too_short":
            expected = f"expected at least {ctx.get('min_length')} item(s)"
        elif kind == "string_too_short":
            expected = "expected a non-empty string"
        else:
            msg = err["msg"]
            expected = "expected " + msg[len("Input should be "):] if msg.startswith(
                "Input should be "
            ) else msg[:1].lower() + msg[1:]
    return f"{expected}, got {describe(value)}"


def _validate(doc: Document, model: type[M]) -> tuple[M | None, list[ConfigError]]:
    errors = list(doc.errors)
    if doc.data is None:
        return None, errors
    if not isinstance(doc.data, dict):
        found = describe(doc.data)
        errors.append(doc.error((), f"expected a mapping at the top level, got {found}"))
        return None, errors
    try:
        base = Path(doc.file).parent if Path(doc.file).is_file() else None
        cfg = model.model_validate(doc.data, context={DEFER_CHECKS: True, BASE_DIR: base})
    except ValidationError as exc:
        raw = exc.errors()
        for err in raw:
            if err["type"] == "too_short" and any(
                len(o["loc"]) > len(err["loc"]) and o["loc"][: len(err["loc"])] == err["loc"]
                for o in raw
            ):
                continue  # a list whose items failed also counts as too short: say it once
            path = _data_path(err["loc"], doc.data, err["type"] == "missing")
            errors.append(doc.error(path, _message(err, model, path)))
        return None, _dedupe(errors)
    problems: list[Problem] = (
        startup_problems(cfg) if isinstance(cfg, StartupConfig) else running_problems(cfg)
    )
    errors.extend(doc.error(path, message) for path, message in problems)
    cfg._source = doc.file
    cfg._lines = dict(doc.lines)
    return (cfg if not errors else None), _dedupe(errors)


def _dedupe(errors: list[ConfigError]) -> list[ConfigError]:
    seen: set[str] = set()
    out = []
    for e in sorted(errors, key=lambda e: (e.line is None, e.line or 0)):
        if str(e) not in seen:
            seen.add(str(e))
            out.append(e)
    return out


def _load(text: str, file: str, model: type[M]) -> M:
    cfg, errors = _validate(parse_yaml(text, file), model)
    raise_errors(errors)
    assert cfg is not None
    return cfg


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def load_startup(path: str | Path | None = None) -> StartupConfig:
    """Load and validate a startup config file; None loads the embedded defaults.

    Raises ConfigError (or ConfigErrors when there are several problems).
    """
    text, name = _embedded("startup.yaml") if path is None else _read(path)
    return _load(text, name, StartupConfig)


def load_running(path: str | Path | None = None) -> RunningConfig:
    """Load and validate a running config file; None loads the embedded defaults."""
    text, name = _embedded("running.yaml") if path is None else _read(path)
    return _load(text, name, RunningConfig)


def parse_startup(text: str, file: str = "<string>") -> StartupConfig:
    """Validate startup config YAML given as text; ``file`` names it in errors."""
    return _load(text, file, StartupConfig)


def parse_running(text: str, file: str = "<string>") -> RunningConfig:
    """Validate running config YAML given as text; ``file`` names it in errors."""
    return _load(text, file, RunningConfig)


def is_startup_data(data: Any) -> bool:
    """A file is a startup file if it has ``spool``, ``environment``, ``cluster``, ``admin``,
    ``metrics``, or a server with ``listeners``; anything else is a running file."""
    if not isinstance(data, dict):
        return False
    if any(key in data for key in ("spool", "environment", "cluster", "admin", "metrics")):
        return True
    servers = data.get("servers")
    return isinstance(servers, list) and any(
        isinstance(s, dict) and "listeners" in s for s in servers
    )


def check_files(paths: list[str]) -> list[ConfigError]:
    """Validate each file as startup or running config (decided per file); [] means OK.

    When exactly one startup and one running file are given and both are valid, their
    servers are cross-checked too.
    """
    errors: list[ConfigError] = []
    startups: list[StartupConfig] = []
    runnings: list[tuple[RunningConfig, str]] = []
    for path in paths:
        try:
            text, name = _read(path)
        except ConfigError as exc:
            errors.append(exc)
            continue
        doc = parse_yaml(text, name)
        model: type[StartupConfig] | type[RunningConfig] = (
            StartupConfig if is_startup_data(doc.data) else RunningConfig
        )
        cfg, errs = _validate(doc, model)
        errors.extend(errs)
        if isinstance(cfg, StartupConfig):
            startups.append(cfg)
        elif isinstance(cfg, RunningConfig):
            hook_error = check_hook(cfg, doc, Path(path).resolve().parent)
            if hook_error is not None:
                errors.append(hook_error)
            else:
                runnings.append((cfg, name))
    if not errors and len(startups) == 1 and len(runnings) == 1:
        try:
            cross_check(startups[0], runnings[0][0], runnings[0][1])
        except ConfigError as exc:
            errors.extend(exc.errors)
    return errors


def check_hook(cfg: RunningConfig, doc: Document, base_dir: Path) -> ConfigError | None:
    """Load the pre-delivery hook as the daemon will (relative paths against ``base_dir``, the
    running file's folder), so that a missing file, an import error or a wrong signature is
    found by ``config check`` rather than at start. None when there is no hook or it loads.
    """
    spec = cfg.scripting.hooks.predelivery
    if spec is None:
        return None
    from ferrymail.hooks import PredeliveryHook

    try:
        PredeliveryHook.load(spec, timeout=cfg.scripting.hooks.timeout, base_dir=base_dir)
    except ValueError as exc:
        return doc.error(("scripting", "hooks", "predelivery"), str(exc))
    return None


def cross_check(startup: StartupConfig, running: RunningConfig, running_file: str) -> None:
    """Check that startup and running configs describe the same servers.

    Every running ``servers[].id`` must be a startup server, and every startup server needs
    running settings (its default transport). Raises ConfigError/ConfigErrors naming
    ``running_file``.
    """
    lines = running._lines

    def line(path: KeyPath) -> int | None:
        for n in range(len(path), -1, -1):
            if path[:n] in lines:
                return lines[path[:n]]
        return None

    errors: list[ConfigError] = []
    startup_ids = [s.id for s in startup.servers]
    running_ids = {s.id for s in running.servers}
    for i, server in enumerate(running.servers):
        if server.id not in startup_ids:
            path: KeyPath = ("servers", i, "id")
            shown = ", ".join(startup_ids) if startup_ids else "none"
            errors.append(
                ConfigError(
                    running_file, format_path(path), line(path),
                    f"server {server.id!r} is not in the startup configuration "
                    f"(startup servers: {shown})",
                )
            )
    tls_servers = {s.id for s in startup.servers if s.tls.enabled}
    for i, server in enumerate(running.servers):
        if server.auth is not None and server.id in startup_ids and server.id not in tls_servers:
            path = ("servers", i, "auth")
            errors.append(ConfigError(
                running_file, format_path(path), line(path),
                f"AUTH is offered only under TLS, and startup server {server.id!r} has no "
                "tls.cert/tls.key"))
    for server in startup.servers:
        if server.id not in running_ids:
            errors.append(
                ConfigError(
                    running_file, "servers", line(("servers",)),
                    f"startup server {server.id!r} has no running settings "
                    "(add a servers[] entry with its id and transport)",
                )
            )
    raise_errors(errors)


__all__ = [
    "Document",
    "check_files",
    "check_hook",
    "cross_check",
    "is_startup_data",
    "load_running",
    "load_startup",
    "parse_running",
    "parse_startup",
    "parse_yaml",
]
