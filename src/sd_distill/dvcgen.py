"""``dvc.yaml`` generated from the stage registry (``sd-distill dvc``); a test fails when the file drifts.

Rounds of one stage (``halve@32``, ``halve@16``...) become one DVC ``foreach`` stage, so DVC names them
``halve@32``... exactly as the registry does. A stage's code dependencies are the source files its entry
imports (``codedeps``).
"""

from __future__ import annotations

from itertools import groupby
from pathlib import Path

import yaml

from sd_distill import codedeps, registry

HEADER = "# Generated from src/sd_distill/registry.py by `sd-distill dvc`. Do not edit by hand.\n"


def _entry(s: registry.Stage, name: str, inputs: list[str], outputs: list[str]) -> dict:
    entry: dict = {"cmd": f"sd-distill run {name}"}
    entry["deps"] = list(dict.fromkeys([*inputs, *codedeps.stage_code(s.entry)]))  # the code it imports
    entry["params"] = ["profile", "base", s.params_section]
    outs = [*outputs, *({path: {"cache": False}} for path in s.reports.values())]
    if outs:
        entry["outs"] = outs
    if s.metrics:
        entry["metrics"] = [{path: {"cache": False}} for path in s.metrics.values()]
    if s.plots:
        entry["plots"] = [{path: {"cache": False}} for path in s.plots.values()]
    return entry


def render() -> str:
    stages: dict = {}
    for group, members in groupby(registry.STAGES, key=lambda s: s.group):
        members = list(members)
        first = members[0]
        if len(members) == 1 and "@" not in first.name:
            stages[group] = _entry(first, first.name, list(first.inputs.values()), list(first.outputs.values()))
            continue
        items = {s.name.split("@")[1]: {**s.inputs, **s.outputs} for s in members}
        do = _entry(first, f"{group}@${{key}}", [f"${{item.{r}}}" for r in first.inputs],
                    [f"${{item.{r}}}" for r in first.outputs])
        stages[group] = {"foreach": items, "do": do}
    plots = [{path: spec} for s in registry.STAGES for path, spec in s.plot_specs.items()]
    body = {"stages": stages, **({"plots": plots} if plots else {})}
    return HEADER + yaml.safe_dump(body, sort_keys=False, width=120)


def write(path: Path = Path("dvc.yaml")) -> bool:
    """Write ``dvc.yaml``; returns True when it changed."""
    text = render()
    if path.is_file() and path.read_text() == text:
        return False
    path.write_text(text)
    return True
