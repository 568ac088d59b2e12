"""``python -m tests.slurm_dry_run <script.sh> <train overrides...>``: the real ``bmp_lightning.train -m`` command line
with the submitit SLURM launcher, up to and including writing the sbatch script and pickling the jobs; only the two
calls that need a cluster are replaced: ``sbatch`` (the script is copied to ``<script.sh>``, the job id is 4242) and
waiting for the results (every job reports success)."""

from __future__ import annotations

import os
import runpy
import sys
import tempfile
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from submitit.slurm import slurm


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    # submitit's SlurmExecutor checks that `srun` exists; it is never run here
    bin_dir = Path(tempfile.mkdtemp(prefix="fake_slurm_"))
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    slurm.SlurmExecutor._make_submission_command = lambda self, path: [
        "bash", "-c", 'cp "$0" "$1" && echo "Submitted batch job 4242"', str(path), out,
    ]  # fmt: skip
    slurm.SlurmJob.results = lambda self: [JobReturn(status=JobStatus.COMPLETED, _return_value=None)]
    sys.argv = ["bmp_lightning.train", *args]
    runpy.run_module("bmp_lightning.train", run_name="__main__")


if __name__ == "__main__":
    main()
