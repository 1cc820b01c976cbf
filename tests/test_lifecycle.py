"""The transition table drives the Machine, the projection and replay checks."""

from __future__ import annotations

import pytest
from transitions import MachineError

from statemachine import catalog as c
from statemachine.lifecycle import BY_TAG, TRANSITIONS, Lifecycle, State, next_state
from statemachine.workspace import open_log
from events import ProjectionError


def test_every_plugin_event_type_belongs_to_exactly_one_transition():
    tags = [t.tag for t in TRANSITIONS]
    assert len(tags) == len(set(tags))
    plugin_types = {cls for cls in c.EVENT_TYPES if cls.__struct_config__.tag in BY_TAG}
    assert plugin_types == {t.event for t in TRANSITIONS}
    assert len({t.trigger for t in TRANSITIONS}) == len(TRANSITIONS)


def test_every_state_is_reachable_from_new():
    reached, frontier = {State.NEW}, [State.NEW]
    while frontier:
        state = frontier.pop()
        for t in TRANSITIONS:
            if state in t.sources and t.dest not in reached:
                reached.add(t.dest)
                frontier.append(t.dest)
    assert reached == set(State)


def test_next_state_follows_the_table_and_refuses_the_rest():
    assert next_state("new", "PluginDiscovered") == State.DISCOVERED
    assert next_state("planning", "RequestFailed") == State.RETRYING
    with pytest.raises(ProjectionError, match="illegal transition: PlanReceived"):
        next_state("analyzed", "PlanReceived")
    with pytest.raises(ProjectionError, match="not a plugin lifecycle event"):
        next_state("analyzed", "RunStarted")


def _discovered(pid="plugins/x/p"):
    return c.PluginDiscovered(plugin_id=pid, name="p", category="x", path=pid, listed=True,
                              skill_name="p")


def test_machine_records_legal_transitions_and_refuses_illegal_ones(tmp_path):
    with open_log(tmp_path, tmp_path / "log.db") as store:
        lifecycle = Lifecycle(store)
        cursor = lifecycle.cursor("plugins/x/p")
        lifecycle.record(cursor, _discovered())
        lifecycle.record(cursor, c.PluginAnalyzed(content_hash="h1", facts=c.PluginFacts()))
        with pytest.raises(MachineError):
            lifecycle.record(cursor, c.PlanReceived(
                run_id="r", request_id="q", usage=c.Usage(),
                plan=c.Plan(gaps=[], quality_before=1, quality_after=2, sections_to_add=[],
                            bundled_files=[], trigger_phrases=[], allowed_tools=[])))
        assert cursor.state == "analyzed"
        assert store.query("SELECT count(*) FROM events") == [(2,)]
        lifecycle.release(cursor)
        again = lifecycle.cursor("plugins/x/p")  # state and version come from the projection
        assert (again.state, again.version) == ("analyzed", 2)
        assert store.verify() == []


def test_a_failed_append_leaves_the_machine_state_unchanged(tmp_path):
    with open_log(tmp_path, tmp_path / "log.db") as store:
        lifecycle = Lifecycle(store)
        cursor = lifecycle.cursor("plugins/x/p")
        lifecycle.record(cursor, _discovered())
        stale = lifecycle.cursor("plugins/x/p")
        lifecycle.record(cursor, c.PluginInvalid(reason="bad"))
        from events import StreamConflict
        with pytest.raises(StreamConflict):
            lifecycle.record(stale, c.PluginAnalyzed(content_hash="h", facts=c.PluginFacts()))
        assert stale.state == "discovered"
        assert store.query("SELECT state FROM plugins") == [("invalid",)]
