"""docs/architecture.md carries the lifecycle and the event catalogue generated from code."""

from statemachine import docs


def test_architecture_doc_is_generated_from_the_current_code():
    current = docs.ARCHITECTURE.read_text(encoding="utf-8")
    assert docs.render(current) == current, (
        "docs/architecture.md is stale: run `uv run python -m statemachine.docs`"
    )


def test_every_transition_and_event_type_appears_in_the_doc():
    from statemachine.catalog import EVENT_TYPES
    from statemachine.lifecycle import TRANSITIONS

    text = docs.ARCHITECTURE.read_text(encoding="utf-8")
    for t in TRANSITIONS:
        assert f"`{t.trigger}`" in text
    for cls in EVENT_TYPES:
        assert f"`{cls.__struct_config__.tag}`" in text
