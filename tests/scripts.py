"""Load a script of examples/ as a module, so tests call its main() and helpers in-process, or launch
examples/finetune.py as two real gloo processes."""

import importlib.util
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A script run as `python examples/X.py` finds its sibling modules (examples/_args.py) on sys.path[0]; loaded here, it
# finds them through this entry.
sys.path.insert(0, os.path.join(ROOT, "examples"))


def load_example(name: str):
    """``examples/<name>.py`` as a fresh module (each call executes the file again)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (explore.py's) look their module up by name
    spec.loader.exec_module(module)
    return module


def launch_two_processes(args, log_path, timeout: float = 300.0) -> None:
    """``accelerate launch --multi_gpu --num_processes 2 examples/finetune.py ARGS`` on CPU (gloo); fails the
    test with the log's tail when the run fails or does not exit within ``timeout`` seconds."""
    import psutil
    import pytest

    # A clean environment: in-process runs earlier in the session leave accelerate/torch.distributed
    # variables in os.environ that must not leak into the launched ranks.
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update({"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"})
    with socket.socket() as sock:  # a free port, so a busy default rendezvous port cannot stall the test
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
              os.path.join(ROOT, "examples", "finetune.py")]
    with open(log_path, "w") as log:  # a file, not a pipe: a stuck rank cannot block the reader
        proc = subprocess.Popen(launch + list(args), env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
                child.kill()  # the launcher and both ranks, so no worker outlives the test
            proc.wait()
            pytest.fail(f"2-process run did not exit within {timeout:.0f} s: {open(log_path).read()[-3000:]}")
    assert proc.returncode == 0, f"2-process run failed: {open(log_path).read()[-3000:]}"
