"""Kill-during-write fault injection shared by the checkpoint tests of models and pretraining."""
import os
import signal
import subprocess
import sys
import time


def kill_writer_after(script: str, argument, delay: float) -> None:
    """Runs ``python -c script argument`` (one OMP thread), waits for the "ready" line it prints before it starts
    writing, lets it write for ``delay`` seconds, then SIGKILLs it and waits for it to end."""
    with subprocess.Popen([sys.executable, "-c", script, str(argument)], stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1")) as process:
        assert process.stdout.readline().strip() == "ready"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
