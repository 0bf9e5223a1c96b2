"""Runs the compiled pipeline with kfp.local's SubprocessRunner (this environment's Python) in a process of its own,
so that tests/conftest.py can start it in the background while other tests run.

    python tests/kfp_driver.py BASE     the smoke pipeline with BASE/project as its workdir

Prints one JSON document on its last line of stdout: every output artifact's path and metadata, and the seconds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from kfp import local

from sd_distill.orchestrators import kubeflow


def main(base: Path) -> dict:
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(base / "pipeline-root"))
    started = time.time()
    task = kubeflow.build()(profile="smoke", workdir=str(base / "project"), gpus=0)
    outputs = {name: {"path": out.path, "metadata": dict(out.metadata)} for name, out in task.outputs.items()
               if hasattr(out, "path")}
    return {"outputs": outputs, "seconds": time.time() - started}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
