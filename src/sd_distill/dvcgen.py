"""``dvc.yaml`` generated from the stage registry (``sd-distill dvc``); a test fails when the file drifts."""

from __future__ import annotations

from pathlib import Path

import yaml

from sd_distill import registry

HEADER = "# Generated from src/sd_distill/registry.py by `sd-distill dvc`. Do not edit by hand.\n"


def render() -> str:
    stages = {}
    for s in registry.STAGES:
        entry: dict = {"cmd": f"sd-distill run {s.name}"}
        deps = list(dict.fromkeys([*s.inputs.values(), *registry.CODE_COMMON, *s.code]))
        entry["deps"] = deps
        entry["params"] = ["profile", "base", s.params_section]
        if s.outputs:
            entry["outs"] = list(s.outputs.values())
        if s.metrics:
            entry["metrics"] = [{path: {"cache": False}} for path in s.metrics.values()]
        if s.plots:
            entry["plots"] = [{path: {"cache": False}} for path in s.plots.values()]
        stages[s.name] = entry
    return HEADER + yaml.safe_dump({"stages": stages}, sort_keys=False, width=120)


def write(path: Path = Path("dvc.yaml")) -> bool:
    """Write ``dvc.yaml``; returns True when it changed."""
    text = render()
    if path.is_file() and path.read_text() == text:
        return False
    path.write_text(text)
    return True
