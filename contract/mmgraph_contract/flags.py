"""A settings model's fields as command-line flags, and back: the one codec of a worker's command line.

A field `max_batch_size` is the flag `--max-batch-size`; a nested model's fields are flags of their own (flat: the
media policy's `--max-bytes`, not `--media-max-bytes`); true booleans are bare flags, false ones left out; a list
field is comma-joined, unless it is `Repeated` (one flag per item). `to_argv` writes only the fields that were set
(`model_fields_set`), in the model's FLAG_ORDER or else declaration order: what the renderer chose is what a pod's
command shows, and the defaults stay the worker's. `from_argv` refuses an unknown flag or a bad value as argparse
does (exit 2), so a typo fails the pod at once.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class Repeated:
    """Marks a list field given as one flag per item (`--engine-arg=a --engine-arg=b`)."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _nested(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _leaves(model: type[BaseModel]) -> Iterator[tuple[str, Any, tuple[str, ...]]]:
    """(field name, field info, path of the nested models it is in) for every flag of `model`."""
    for name, field in model.model_fields.items():
        if (inner := _nested(field.annotation)) is not None:
            yield from ((n, f, (name, *path)) for n, f, path in _leaves(inner))
        else:
            yield name, field, ()


def _kind(field: Any) -> str:
    base = field.annotation
    if typing.get_origin(base) in (typing.Union, types.UnionType):  # X | None: X's kind
        base = next(a for a in typing.get_args(base) if a is not type(None))
    if base is bool:
        return "bool"
    if typing.get_origin(base) is list:
        return "repeated" if any(isinstance(m, Repeated) for m in field.metadata) else "list"
    return "value"


def to_argv(settings: BaseModel) -> list[str]:
    """The flags of the fields set in `settings` (and in the nested models set in it), in the model's FLAG_ORDER
    (leaf field names) where it has one, else in declaration order."""
    flags = _flags(settings)
    order = getattr(type(settings), "FLAG_ORDER", ())
    flags.sort(key=lambda leaf: order.index(leaf[0]) if leaf[0] in order else len(order))  # stable
    return [f for _, fs in flags for f in fs]


def _flags(settings: BaseModel) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for name, field in type(settings).model_fields.items():
        if name not in settings.model_fields_set:
            continue
        value = getattr(settings, name)
        if isinstance(value, BaseModel):
            out += _flags(value)
            continue
        kind = _kind(field)
        if value is None or value is False:
            continue
        if kind == "bool":
            out.append((name, [flag(name)]))
        elif kind == "list":
            out.append((name, [f"{flag(name)}={','.join(str(v) for v in value)}"]))
        elif kind == "repeated":
            out.append((name, [f"{flag(name)}={v}" for v in value]))
        else:
            out.append((name, [f"{flag(name)}={value:g}" if isinstance(value, float) else f"{flag(name)}={value}"]))
    return out


def from_argv(model: type[M], argv: Sequence[str], prog: str | None = None) -> M:
    """`model` from a command line `to_argv` wrote (or a person typed); argparse's errors (exit 2) on a bad one,
    the model's validation after."""
    parser = argparse.ArgumentParser(prog=prog, argument_default=argparse.SUPPRESS)
    for name, field, _ in _leaves(model):
        kind, help_text = _kind(field), field.description
        if kind == "bool":
            parser.add_argument(flag(name), action="store_true", help=help_text)
        elif kind == "repeated":
            parser.add_argument(flag(name), action="append", help=help_text)
        elif kind == "list":
            parser.add_argument(flag(name), type=lambda s: [v for v in s.split(",") if v], help=help_text)
        else:
            parser.add_argument(flag(name), required=field.is_required(), help=help_text)
    given = vars(parser.parse_args(list(argv)))
    values: dict[str, Any] = {}
    for name, _, path in _leaves(model):
        target = values
        for part in path:  # every nested model, given flags or not: its defaults, or its missing fields named
            target = target.setdefault(part, {})
        if name in given:
            target[name] = given[name]
    try:
        return model.model_validate(values)
    except ValidationError as err:
        parser.error("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors(include_url=False)))
