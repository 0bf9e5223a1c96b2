"""Kubeflow Pipelines v2 pipeline ``sd-distill``, built from the stage registry (src/sd_distill/registry.py).

    python components/pipeline.py              # = `sd-distill kfp compile`: writes sd_distill_pipeline.yaml
    python components/pipeline.py --image ghcr.io/me/sd-distill-trainer:dev

or submit straight from Python::

    import kfp
    from components.pipeline import pipeline
    kfp.Client(host=...).create_run_from_pipeline_func(pipeline, arguments={"profile": "sd15"})

The components and their pods are defined in ``sd_distill.orchestrators.kubeflow``; they live in the
package because every component's pod imports it from the trainer image.
"""

import sys

from sd_distill.orchestrators.kubeflow import build

pipeline = build()

if __name__ == "__main__":
    from sd_distill.cli import main

    sys.exit(main(["kfp", "compile", *sys.argv[1:]]))
