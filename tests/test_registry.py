import json
import subprocess
from pathlib import Path

from sd_distill import dvcgen, registry
from sd_distill.params import SECTIONS
from tests.conftest import BIN, ROOT


def test_committed_dvc_yaml_is_generated_from_registry():
    assert (ROOT / "dvc.yaml").read_text() == dvcgen.render(), "dvc.yaml is stale: run `sd-distill dvc`"


def test_registry_invariants_hold():
    registry.check()
    names = [s.name for s in registry.STAGES]
    assert names == ["prepare", "teacher", "encode", "vpred", "guidance", "prune", "halve@32", "halve@16", "halve@8",
                     "halve@4", "halve@2", "halve@1", "decoder", "assemble", "evaluate", "register"]
    for s in registry.STAGES:
        assert s.params_section in SECTIONS


def test_stages_json_and_dvc_yaml_list_same_stages_and_edges():
    """DVC's own reading of dvc.yaml (foreach expanded) against `sd-distill stages --json`."""
    from dvc.repo import Repo

    out = subprocess.run([str(BIN / "sd-distill"), "stages", "--json"], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    listed = json.loads(out.stdout)
    with Repo(str(ROOT)) as repo:
        stages = {s.addressing: s for s in repo.index.stages}
        produced = {str(o.def_path): name for name, s in stages.items() for o in s.outs}
        dvc_edges = sorted({(produced[str(d.def_path)], name) for name, s in stages.items() for d in s.deps
                            if str(d.def_path) in produced})
    assert sorted(s["name"] for s in listed["stages"]) == sorted(stages)
    assert sorted(tuple(e) for e in listed["edges"]) == dvc_edges
    for edge in [("prepare", "teacher"), ("teacher", "vpred"), ("vpred", "guidance"), ("guidance", "prune"),
                 ("prune", "halve@32"), ("halve@2", "halve@1"), ("halve@1", "assemble"), ("teacher", "decoder"),
                 ("decoder", "assemble"), ("assemble", "evaluate")]:
        assert edge in dvc_edges


def test_every_stage_entry_and_code_path_exist():
    import importlib

    for s in registry.STAGES:
        module, fn = s.entry.split(":")
        assert callable(getattr(importlib.import_module(module), fn))
        for path in s.code:
            assert (ROOT / path).exists(), f"{s.name}: code dep {path} missing"


def test_dvc_check_flags_a_stale_file(tmp_path):
    (tmp_path / "dvc.yaml").write_text(dvcgen.render().replace("prepare", "prep", 1))
    rc = subprocess.run([str(BIN / "sd-distill"), "dvc", "--check"], cwd=tmp_path, capture_output=True, text=True)
    assert rc.returncode == 1 and "out of date" in rc.stderr
    subprocess.run([str(BIN / "sd-distill"), "dvc"], cwd=tmp_path, check=True, capture_output=True)
    assert Path(tmp_path / "dvc.yaml").read_text() == dvcgen.render()
