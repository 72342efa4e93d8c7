"""The documentation stays true: marked code blocks run, the CLI reference covers the
parser, every example is shown, every page is in the site's navigation, and each Turkish
page has its English counterpart.

A Python block preceded by the line ``<!-- runnable -->`` is executed (blocks of one page
in order, sharing one namespace, in a temporary folder); functions it defines named
``test_*`` are then called. Mark only blocks that need no download and run in seconds.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUNNABLE = re.compile(r"^<!-- runnable -->\n```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
TRANSLATED = ("index.md", "user-guide.md", "cli.md", "plugins.md")


def runnable_blocks(page: Path) -> list[str]:
    return RUNNABLE.findall(page.read_text(encoding="utf-8"))


def pages_with_runnable_blocks() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if runnable_blocks(p))


def gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pages_that_promise_runnable_code_have_it():
    names = {str(p.relative_to(DOCS)) for p in pages_with_runnable_blocks()}
    assert {"getting-started.md", "user-guide.md", "plugins.md", "tr/user-guide.md", "tr/plugins.md"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("page", pages_with_runnable_blocks(), ids=lambda p: str(p.relative_to(DOCS)))
def test_runnable_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "example_plugin"))  # the plugin guide's package
    monkeypatch.setenv("CLEANAI_DISABLE_PLUGIN_AUTOLOAD", "1")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    namespace: dict = {"__name__": "docs_block"}
    for i, block in enumerate(runnable_blocks(page)):
        exec(compile(block, f"{page.name}[block {i}]", "exec"), namespace)  # noqa: S102
    tests = [f for name, f in namespace.items() if name.startswith("test_") and callable(f)]
    for test in tests:
        test()
    assert namespace.keys() - {"__name__", "__builtins__"}, "the blocks defined nothing"


def test_cli_reference_lists_every_command_and_option():
    from cleanai_core.cli import build_parser

    module = gen_cli()
    for lang in ("en", "tr"):
        text = module.render(lang)
        commands = module._subcommands(build_parser())
        assert set(re.findall(r"^## `cleanai (\w+)`", text, re.MULTILINE)) == set(commands)
        for name, (sub, _) in commands.items():
            for action in sub._actions:
                for opt in action.option_strings:
                    if opt not in ("-h", "--help"):
                        assert f"`{opt}" in text, f"cleanai {name} {opt} missing from the {lang} CLI reference"
    assert "| seçenek | anlamı | varsayılan |" in module.render("tr")


def test_cli_reference_marker_is_replaced_in_both_languages():
    module = gen_cli()
    for page, lang in ((DOCS / "cli.md", "en"), (DOCS / "tr" / "cli.md", "tr")):
        markdown = page.read_text(encoding="utf-8")
        assert f"<!-- cli-reference{'' if lang == 'en' else ' lang=tr'} -->" in markdown
        rendered = module.on_page_markdown(markdown, None, None, None)
        assert "<!-- cli-reference" not in rendered and "## `cleanai prune`" in rendered


def test_every_example_is_shown_in_the_docs():
    shown = (DOCS / "examples.md").read_text(encoding="utf-8")
    for script in sorted((ROOT / "examples").glob("*.py")):
        assert f'--8<-- "examples/{script.name}"' in shown, f"{script.name} is not on the examples page"


def test_every_page_is_in_the_navigation_and_every_turkish_page_has_its_english_one():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = set(re.findall(r":\s+([\w/.-]+\.md)\s*$", config, re.MULTILINE))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages == nav, f"not in nav: {sorted(pages - nav)}; missing files: {sorted(nav - pages)}"
    assert {p.name for p in (DOCS / "tr").glob("*.md")} == set(TRANSLATED)


@pytest.mark.parametrize("name", ["README.md", "CONTRIBUTING.md"])
def test_links_outside_the_site_point_at_files_that_exist(name):
    """The site's links are checked by ``mkdocs build --strict``; these pages are read on
    the repository host, outside it."""
    page = ROOT / name
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8"))
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, f"{name} links nothing"
    missing = [t for t in local if not (page.parent / t).exists()]
    assert not missing, f"{name} links to missing files: {missing}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
