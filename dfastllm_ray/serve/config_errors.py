"""Config errors a person can act on: every problem in an `args:` mapping on one line, by its
YAML path (`models[tiny-llada].deployment.num_replicas`, the model's id rather than its index),
with the value given and, for a misspelt key, the field it most likely meant.

Pydantic's own text for the same mistakes reads `models.0.modle_source  Extra inputs are not
permitted [type=extra_forbidden, ...]`, with no hint of the right name; Ray's and the engine's
dataclasses say `__init__() got an unexpected keyword argument`.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Optional

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A bad `args:` mapping (or a part of one): the message lists every problem, one per line."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or '' when none is close."""
    close = difflib.get_close_matches(str(name), sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key_message(path: str, key: str, choices: Iterable[str]) -> str:
    choices = sorted(choices)
    return (f"{path}.{key}: unknown field{did_you_mean(key, choices)}; "
            f"the fields here are: {', '.join(choices)}")


def check_keys(given: Mapping[str, Any], names: Iterable[str], path: str) -> None:
    """Refuse keys of `given` that are not in `names`, each with the name it most likely meant
    (a dataclass's `cls(**given)` would raise an unnamed TypeError; some of Ray's schemas drop
    unknown keys without a word)."""
    names = set(names)
    bad = [unknown_key_message(path, str(key), names) for key in given if key not in names]
    if bad:
        raise ConfigError("\n".join(bad))


def dataclass_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _model_in(annotation: Any) -> Optional[type[BaseModel]]:
    """The pydantic model class inside an annotation (`Optional[X]`, `list[X]`, `X`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _label(node: Any, index: int) -> str:
    """A list item's name in a path: its `model_id` (a model) or `name` (a Serve application)
    where it has one, else its index."""
    item = node[index] if isinstance(node, list) and 0 <= index < len(node) else None
    ident = (item.get("model_id") or item.get("name")) if isinstance(item, Mapping) else None
    return ident if isinstance(ident, str) and ident else str(index)


def _walk(loc: tuple, root: type[BaseModel], args: Any) -> tuple[str, type[BaseModel]]:
    """(YAML path, the model class that holds its last field) of a pydantic error location;
    the union-member tags pydantic appends after a leaf field (`int`, `literal['auto']`) are
    dropped, so each member's complaint lands on the same path."""
    path, cls, holder, node = "", root, root, args
    for item in loc:
        if isinstance(item, int):
            path += f"[{_label(node, item)}]"
            node = node[item] if isinstance(node, list) and 0 <= item < len(node) else None
            continue
        if cls is None:
            break
        holder = cls
        path += f".{item}" if path else str(item)
        node = node.get(item) if isinstance(node, Mapping) else None
        field = cls.model_fields.get(item)
        cls = _model_in(field.annotation) if field is not None else None
    return path, holder


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def format_validation_error(exc: ValidationError, root: type[BaseModel], args: Any,
                            top: str = "args") -> str:
    """One line per bad field of `args` (validated as `root`): path, value, what is wrong.
    `top` names `args` itself; "" (a mapping checked inside a field's validator) starts each
    path with "." so the field's own path can be put in front of it."""
    lines: dict[str, tuple[str, list[str]]] = {}
    for err in exc.errors():
        path, holder = _walk(tuple(err["loc"]), root, args)
        path = f".{path}" if path and not top else path
        if err["type"] == "extra_forbidden":
            parent, _, key = path.rpartition(".")
            line = unknown_key_message(parent or top, key, holder.model_fields)
            lines[path] = ("", [line.split(": ", 1)[1]])
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if msg.startswith("."):           # a nested check's lines, each with its own path
            for nested in msg.split("\n"):
                lines[path + nested] = ("", [])
            continue
        msg = "required field missing" if err["type"] == "missing" else msg
        value = "" if err["type"] == "missing" or isinstance(err["input"], Mapping) \
            else f"={_shown(err['input'])}"
        lines.setdefault(path or top, (value, []))[1].append(msg)
    return "\n".join(_line(path, value, msgs) for path, (value, msgs) in lines.items())


def _line(path: str, value: str, msgs: list[str]) -> str:
    if not msgs:                          # a nested line, already whole
        return path
    text = "; or ".join(msgs)             # a union's members: what each would have needed
    return f"{path}{value}: {text}" if path else text


def validate(root: type[BaseModel], args: Any, top: str = "args") -> Any:
    """`root.model_validate(args)`, raising `ConfigError` with `format_validation_error`'s text."""
    try:
        return root.model_validate(args)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, root, args, top)) from None


def unknown_keys(root: type[BaseModel], data: Any, path: str = "") -> list[str]:
    """A line per key of `data` (and of the mappings inside it that are models too) that is no
    field of `root`: for schemas that ignore unknown keys (Ray Serve's config schemas keep
    `rout_prefix: /` without a word, and serve the app at the default route)."""
    if not isinstance(data, Mapping):
        return []
    fields = {name: f for name, f in root.model_fields.items()}
    fields.update({f.alias: f for f in root.model_fields.values() if f.alias})
    lines = []
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            lines.append(unknown_key_message(path or "config", str(key), root.model_fields))
            continue
        inner = _model_in(field.annotation)
        where = f"{path}.{key}" if path else str(key)
        if inner is not None and isinstance(value, list):
            for i, item in enumerate(value):
                lines += unknown_keys(inner, item, f"{where}[{_label(value, i)}]")
        elif inner is not None:
            lines += unknown_keys(inner, value, where)
    return lines
