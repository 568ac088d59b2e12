"""bmp_lightning.utils.distributed: which launch starts a process group, and a 2-task srun step emulated on a CPU
(the environment srun gives its tasks) joining one gloo group."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from bmp_lightning.utils.distributed import launcher_environment

ROOT = Path(__file__).resolve().parents[2]

SNIPPET = """
import json
from bmp_lightning.utils.distributed import init_distributed
ctx = init_distributed("cpu")
print(json.dumps({"rank": ctx.rank, "world": ctx.world_size, "backend": ctx.backend,
                  "gathered": ctx.gather(ctx.shard(list(range(5)))), "root": ctx.broadcast(f"dir-of-{ctx.rank}")}))
ctx.close()
"""


def _clean_env(monkeypatch) -> None:
    for key in list(os.environ):
        if key.startswith(("SLURM_", "TORCHELASTIC_")) or key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK"):
            monkeypatch.delenv(key)


def test_launcher_environment(monkeypatch) -> None:
    _clean_env(monkeypatch)
    assert launcher_environment() is None, "a plain process"
    # inside an sbatch script of 4 tasks but not under srun: still a single process (no waiting for 3 others)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_JOB_NAME", "bmp")
    assert launcher_environment() is None
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    env = launcher_environment()
    assert type(env).__name__ == "SLURMEnvironment" and env.world_size() == 4


def test_two_srun_tasks_join_one_group(monkeypatch) -> None:
    _clean_env(monkeypatch)
    job = str(random.randint(1000, 9999))  # the rendezvous port is derived from the job id (Lightning's rule)
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, SLURM_JOB_ID=job, SLURM_JOB_NAME="bmp", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2",
                   SLURM_NTASKS_PER_NODE="2",
                   SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0", SLURM_NODELIST="127.0.0.1",
                   OMP_NUM_THREADS="1")  # fmt: skip
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        procs.append(subprocess.Popen([sys.executable, "-c", SNIPPET], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert [(o["rank"], o["world"], o["backend"]) for o in outs] == [(0, 2, "gloo"), (1, 2, "gloo")]
    assert outs[0]["gathered"] == [[0, 2, 4], [1, 3]] and outs[1]["gathered"] is None
    assert outs[0]["root"] == outs[1]["root"] == "dir-of-0"
