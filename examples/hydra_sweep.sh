#!/usr/bin/env bash
# A Hydra multirun: TRAK's damping ratio x projection dimension on the demo experiment, CSV logger.
# Each job writes outputs to multirun/DATE/TIME/JOB/attrib; compare their mislabel AUROC in the CSV logs.
# Run with the project's interpreter: `PYTHON=.venv/bin/python bash examples/hydra_sweep.sh`.
set -euo pipefail
"${PYTHON:-python}" -m lightning_attrib -m experiment=demo logger=csv \
  +attribution.method_kwargs.damping_ratio=0.1,1.0 attribution.proj_dim=512,1024
