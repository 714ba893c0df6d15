"""Plain data straight from libyaml's event stream: the fast way to read a
large policy.

PyYAML's safe loader composes a node tree (every node with its position,
every plain scalar resolved by a Python call) before it builds the data;
on a 10,000-rule policy that tree is most of the load time. Here libyaml
(CSafeLoader's parser) gives the events, and the mappings, lists and
scalars are built from them directly, with the safe loader's own
resolver and constructors, so the result is the value the safe loader
gives.

Only the plain document is taken this way. Anything else (anchors and
aliases, explicit tags, merge keys, complex keys, duplicate keys, more
than one document, characters the pure reader refuses, any error) returns
:data:`SLOW`: the caller takes the node tree, which reports the problem
with its position exactly as before.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import (
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)
from yaml.reader import Reader
from yaml.resolver import Resolver

SLOW = object()

_STR = "tag:yaml.org,2002:str"
# Resolved tags whose values the safe constructor builds from the text
# alone (str is the text itself). Any other tag goes the slow way.
_SCALAR_TAGS = ("tag:yaml.org,2002:null", "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int",
                "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")
_MAP_TAG = Resolver.DEFAULT_MAPPING_TAG
_SEQ_TAG = Resolver.DEFAULT_SEQUENCE_TAG


class _Bail(Exception):
    """Not a plain document: take the slow path."""


class _Builder:
    def __init__(self):
        self.resolver = Resolver()
        self.constructor = SafeConstructor()
        self.tags: dict[tuple[str, tuple[bool, bool]], str] = {}

    def scalar(self, ev: ScalarEvent) -> tuple[str, Any]:
        """(resolved tag, value) of a scalar event."""
        if ev.anchor is not None or ev.tag not in (None, "!"):
            raise _Bail
        key = (ev.value, ev.implicit)
        tag = self.tags.get(key)
        if tag is None:
            tag = self.tags[key] = (self.resolver.resolve(yaml.ScalarNode, ev.value, ev.implicit)
                                    if ev.tag is None else _STR)
        if tag == _STR:
            return tag, ev.value
        if tag not in _SCALAR_TAGS:
            raise _Bail
        node = yaml.ScalarNode(tag, ev.value, None, None, ev.style)
        return tag, self.constructor.yaml_constructors[tag](self.constructor, node)

    def collection(self, ev) -> None:
        if ev.anchor is not None or ev.tag not in (None, "!"):
            raise _Bail


def fast_load(text: str) -> Any:
    """The document's plain value (None when empty), or SLOW."""
    if Reader.NON_PRINTABLE.search(text):
        return SLOW
    loader = yaml.CSafeLoader(text)
    try:
        return _read(loader, _Builder())
    except (_Bail, yaml.YAMLError, RecursionError, TypeError, ValueError):
        return SLOW
    finally:
        loader.dispose()


def _read(loader: yaml.CSafeLoader, b: _Builder) -> Any:
    get = loader.get_event
    if not isinstance(get(), StreamStartEvent):
        raise _Bail
    ev = get()
    if isinstance(ev, StreamEndEvent):
        return None
    if not isinstance(ev, DocumentStartEvent):
        raise _Bail
    # An explicit stack instead of recursion: (container, pending key,
    # keys seen as (tag, text)) per open mapping or list.
    stack: list[list[Any]] = []
    result: Any = SLOW
    while True:
        ev = get()
        cls = type(ev)
        if cls is ScalarEvent:
            tag, value = b.scalar(ev)
            item = value
            key_ident = (tag, ev.value)
        elif cls is MappingStartEvent:
            b.collection(ev)
            stack.append([{}, SLOW, set()])
            continue
        elif cls is SequenceStartEvent:
            b.collection(ev)
            stack.append([[], SLOW, None])
            continue
        elif cls is MappingEndEvent or cls is SequenceEndEvent:
            item = stack.pop()[0]
            key_ident = None
        elif cls is DocumentEndEvent:
            break
        else:   # an alias, or anything unexpected
            raise _Bail
        if not stack:
            result = item
            continue
        top = stack[-1]
        container = top[0]
        if top[2] is None:                 # a list
            container.append(item)
        elif top[1] is SLOW:               # a mapping's key
            if key_ident is None or key_ident[0] == "tag:yaml.org,2002:merge" \
                    or key_ident in top[2]:
                raise _Bail                # complex, merge or duplicate key
            top[2].add(key_ident)
            hash(item)
            top[1] = item
        else:                              # a mapping's value
            container[top[1]] = item
            top[1] = SLOW
    if not isinstance(get(), StreamEndEvent):
        raise _Bail                        # more than one document
    return result
