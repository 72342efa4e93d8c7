"""A Griffe extension for the API reference: CleanAI's docstrings are reStructuredText
flavoured (``Example::`` before an indented block, ``:class:`Name``` roles), which the
Markdown renderer would show literally. This turns them into plain Markdown.

Named in ``mkdocs.yml`` under the mkdocstrings ``extensions`` option.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):`~?([^`]+)`")


def clean(text: str) -> str:
    """``:class:`~a.b.Name``` -> ```Name```; a paragraph ending in ``::`` ends in ``:``."""
    text = ROLE.sub(lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", text)
    return re.sub(r"::$", ":", text, flags=re.MULTILINE)


class RstToMarkdown(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = clean(obj.docstring.value)
