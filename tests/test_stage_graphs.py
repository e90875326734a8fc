"""Every shipped pipeline renders the stages, run names, commands, outputs and effective
training configs recorded in tests/fixtures/stage_graphs.json (tests/stage_graphs.py)."""

import json

import pytest

from stage_graphs import PIPELINES, SNAPSHOT, rendered


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_renders_as_recorded(name):
    recorded = json.loads(SNAPSHOT.read_text())[name]
    graph = rendered(name)
    assert [(t["stage"], t["label"]) for t in graph] == [(t["stage"], t["label"]) for t in recorded]
    for task, expected in zip(graph, recorded):
        assert task == expected, f"{name}: stage {task['stage']} ({task['label']}) differs from the snapshot"
