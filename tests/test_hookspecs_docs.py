"""docs/hooks.md documents every hook spec, with the spec's exact signature."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cleanai_core import hookspecs
from cleanai_core.plugins import make_plugin_manager

DOC = Path(__file__).resolve().parents[1] / "docs" / "hooks.md"


def spec_names() -> list[str]:
    pm = make_plugin_manager(load_entrypoints=False, builtins=())
    names = sorted(n for n in vars(pm.hook) if not n.startswith("_"))
    # the manager only knows what the hookspecs module declares, and vice versa
    assert names == sorted(n for n, f in vars(hookspecs).items() if hasattr(f, "cleanai_spec"))
    return names


def sections(text: str) -> dict[str, str]:
    """``{heading: body}`` for every ``## heading`` of the page."""
    parts = re.split(r"^## +(.+?)\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


DOCUMENTED = sections(DOC.read_text())
PM = make_plugin_manager(load_entrypoints=False, builtins=())


def test_there_are_hooks_to_check():
    assert len(spec_names()) == 20
    assert "cleanai_layer_pruner" in DOCUMENTED


@pytest.mark.parametrize("name", spec_names())
def test_hook_is_documented_with_its_signature(name):
    assert name in DOCUMENTED, f"hook {name} has no '## {name}' section in docs/hooks.md"
    body = DOCUMENTED[name]
    found = re.findall(rf"^{name}\(([^)]*)\)", body, flags=re.M)
    assert found, f"section {name} of docs/hooks.md has no signature line '{name}(...)'"
    documented = tuple(a.strip() for a in found[0].split(",") if a.strip())
    spec = getattr(PM.hook, name).spec
    # arguments added later have a default (``findings=None``) and are documented with it
    declared = tuple(spec.argnames) + tuple(f"{a}={spec.kwargdefaults[a]!r}" for a in spec.kwargnames)
    assert documented == declared, f"docs/hooks.md documents {name}{documented}, the spec is {name}{declared}"
    firstresult = bool(spec.opts.get("firstresult"))
    assert ("**firstresult.**" in body) == firstresult, f"{name}: say whether it is firstresult"
    assert ("**collect.**" in body) == (not firstresult), f"{name}: say whether results are collected"
    assert "```python\n" in body.split(f"{name}(", 1)[1], f"section {name} has no example"


def test_no_documented_hook_that_does_not_exist():
    documented_hooks = {h for h in DOCUMENTED if h.startswith("cleanai_")}
    assert documented_hooks == set(spec_names())
    assert set(DOCUMENTED) == documented_hooks, "every ## section of docs/hooks.md is one hook"


def test_sections_follow_the_spec_file_order():
    order = [n for n in vars(hookspecs) if n.startswith("cleanai_")]
    assert [h for h in DOCUMENTED] == order
