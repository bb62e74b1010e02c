"""docs/dashboards.md lists every panel with its exact query and every variable's query, as
the dashboards hold them now."""

from __future__ import annotations

from pathlib import Path

from composemesh.dashboards import all_dashboards, panel_queries
from composemesh.dashboards.docs import BEGIN, END, reference_markdown, with_reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "dashboards.md"


def test_the_doc_lists_every_panel_title_and_query() -> None:
    text = DOC.read_text()
    for model in all_dashboards().values():
        assert f"### {model['title']}" in text
        for title, expr in panel_queries(model):
            assert f"| {title} | `{expr}` |" in text, (title, expr)


def test_the_generated_section_is_current() -> None:
    text = DOC.read_text()
    assert text.count(BEGIN) == text.count(END) == 1
    assert text[text.index(BEGIN):text.index(END) + len(END)] == reference_markdown()
    assert with_reference(text) == text


def test_the_doc_gives_every_variable_query_and_the_import_command() -> None:
    text = DOC.read_text()
    for model in all_dashboards().values():
        for variable in model["templating"]["list"][1:]:
            assert f"`{variable['query']}`" in text, variable["name"]
    assert "composemesh dashboards -o" in text


def test_with_reference_replaces_a_stale_section() -> None:
    stale = f"intro\n{BEGIN}\n| Old panel | `up` |\n{END}\noutro\n"
    assert with_reference(stale) == f"intro\n{reference_markdown()}\noutro\n"
