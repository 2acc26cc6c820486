"""`python -m stemref.edit` for tests under torchrun, with one rank misbehaving on request (test_distributed_cli.py).

    torchrun --nproc-per-node 2 tests/torchrun_edit.py MODE EDIT-ARGUMENTS...

MODE: "plain" (the command as is), "kill" (rank 1 kills itself with SIGKILL when its TokenFlow edit starts: after
the inversion is cached, before anything is written), "disagree" (rank 1 gets one more --steps than rank 0).
"""
import os
import signal
import sys

from stemref.cli.edit import main
from stemref.edit import tokenflow

if __name__ == "__main__":
    mode, argv, rank = sys.argv[1], sys.argv[2:], int(os.environ["RANK"])
    if mode == "kill" and rank == 1:
        def killed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        tokenflow.edit_latents = killed  # the command looks it up on the module at call time
    if mode == "disagree" and rank == 1:
        argv += ["--steps", "3"]
    sys.exit(main(argv))
