"""Shared by the test files: run a script or module the way a user would."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(target: str, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python <target.py> argv...` (or `python -m <target>` for a module) from the repo root,
    offline and with one torch thread (more threads than free cores slow torch down a lot)."""
    cmd = [os.path.join(ROOT, target)] if target.endswith(".py") else ["-m", target]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=ROOT,
               MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *cmd, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
