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
                     "halve@4", "halve@2", "halve@1", "dmd", "decoder", "assemble", "reference", "evaluate", "register"]
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
                 ("prune", "halve@32"), ("halve@2", "halve@1"), ("halve@1", "assemble"), ("halve@1", "dmd"), ("dmd", "evaluate"), ("teacher", "decoder"),
                 ("decoder", "assemble"), ("assemble", "evaluate"), ("prepare", "reference"), ("teacher", "reference"),
                 ("reference", "evaluate")]:
        assert edge in dvc_edges


def test_every_stage_entry_exists_and_its_code_deps_are_the_files_it_imports():
    import importlib
    import sys

    from sd_distill import codedeps

    for s in registry.STAGES:
        module, fn = s.entry.split(":")
        assert callable(getattr(importlib.import_module(module), fn))
        code = codedeps.stage_code(s.entry)
        assert all((ROOT / path).is_file() for path in code)
        assert f"src/{module.replace('.', '/')}.py" in code
        assert {f"src/sd_distill/params/{m}.py" for m in ("__init__", "schema", "presets", "loading")} <= set(code)
    # what running a stage entry loads from the package is what dvc.yaml lists for it (imports inside functions too)
    probe = ("import importlib, sys; m = importlib.import_module(sys.argv[1]); "
             "print('\\n'.join(sorted(n for n in sys.modules if n.startswith('sd_distill'))))")
    for name in ("evaluate", "decoder"):
        entry = registry.get(name).entry.split(":")[0]
        loaded = subprocess.run([sys.executable, "-c", probe, entry], capture_output=True, text=True, check=True)
        listed = set(codedeps.closure(entry))
        assert set(loaded.stdout.split()) <= listed, set(loaded.stdout.split()) - listed
    evaluate = codedeps.stage_code(registry.get("evaluate").entry)
    assert "src/sd_distill/models/costs.py" in evaluate  # MAC counting: a change reruns evaluate
    assert "src/sd_distill/scoring.py" in evaluate and "src/sd_distill/stages/prune.py" not in evaluate


def test_code_deps_follow_imports_inside_functions(tmp_path, monkeypatch):
    from sd_distill import codedeps

    pkg = tmp_path / "sd_distill"
    (pkg / "sub").mkdir(parents=True)
    for init in (pkg / "__init__.py", pkg / "sub" / "__init__.py"):
        init.write_text("")
    (pkg / "entry.py").write_text("import os\ndef main():\n    from sd_distill.sub import late\n")
    (pkg / "sub" / "late.py").write_text("from sd_distill import leaf\n")
    (pkg / "leaf.py").write_text("x = 1\n")
    (pkg / "unused.py").write_text("")
    monkeypatch.setattr(codedeps, "SRC", tmp_path)
    codedeps.direct_imports.cache_clear()
    try:
        assert codedeps.closure("sd_distill.entry") == ["sd_distill", "sd_distill.entry", "sd_distill.leaf",
                                                         "sd_distill.sub", "sd_distill.sub.late"]
    finally:
        codedeps.direct_imports.cache_clear()


def test_dvc_check_flags_a_stale_file(tmp_path):
    (tmp_path / "dvc.yaml").write_text(dvcgen.render().replace("prepare", "prep", 1))
    rc = subprocess.run([str(BIN / "sd-distill"), "dvc", "--check"], cwd=tmp_path, capture_output=True, text=True)
    assert rc.returncode == 1 and "out of date" in rc.stderr
    subprocess.run([str(BIN / "sd-distill"), "dvc"], cwd=tmp_path, check=True, capture_output=True)
    assert Path(tmp_path / "dvc.yaml").read_text() == dvcgen.render()
