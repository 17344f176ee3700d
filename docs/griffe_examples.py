"""Griffe extension for the API site: the package's docstrings head their doctests ``Example:``.

Griffe's Google parser reads only ``Examples:`` as code examples and renders a singular
``Example:`` as a Markdown admonition, where ``>>>`` becomes nested block quotes and a printed
list such as ``[(1, 9, 11, 5)]`` becomes a broken cross-reference. Rename the heading before the
docstring is parsed, so that the examples render (and are checked by doctest) as written.
"""

from __future__ import annotations

import re

import griffe

_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
