"""The limits a graph puts on media (spec.media), as the workers receive them on their command line.

The graph's `MediaSpec` is the policy itself, with its defaults and validation; its fields become the workers'
flags (`--max-bytes=...`), emitted by commands.py and parsed back here: one list of fields, two ends of one
mapping.
"""

from __future__ import annotations

import argparse
import typing

from mmgraph_operator.api import MediaSpec

MediaPolicy = MediaSpec


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_list(name: str) -> bool:
    return typing.get_origin(MediaSpec.model_fields[name].annotation) is list


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per MediaSpec field, defaulting to the field's default (the graph's)."""
    for name, field in MediaSpec.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, bool):
            parser.add_argument(_flag(name), action="store_true", default=default)
        elif _is_list(name):
            parser.add_argument(_flag(name), default=",".join(default))
        else:
            parser.add_argument(_flag(name), type=type(default), default=default)


def from_args(args: argparse.Namespace) -> MediaSpec:
    """The policy from parsed flags, validated by the graph's own model."""
    values = {name: getattr(args, name) for name in MediaSpec.model_fields}
    for name in values:
        if _is_list(name):
            values[name] = [item for item in values[name].split(",") if item]
    return MediaSpec.model_validate(values)
