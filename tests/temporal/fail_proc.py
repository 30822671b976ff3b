"""A rank of a 2-process gloo job under torchrun (`vtn train`, `vtn finetune`, ...) whose rank 1 fails at step 2.

The failing rank then leaves slowly (LEAVE_S seconds before it closes its process group, as a rank with stuck
loader workers would), so rank 0, blocked in DDP's gradient all-reduce waiting for it, can end sooner only through
runtime.FailTogether's watchdog; once one rank has ended, torchrun's agent stops the other.
"""

import os
import signal
import subprocess
import sys
import time

LEAVE_S = 12.0


def fail_together(args: list[str], folder, timeout: float = 300.0) -> tuple[int, str, float]:
    """(torchrun's exit code, the ranks' stderr, seconds from rank 1's failure to the job's end)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "FAIL_AT": str(folder / "failed_at")})
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ended = time.time()
    return proc.returncode, stderr, ended - float((folder / "failed_at").read_text())


def check_failed_together(code: int, stderr: str, seconds: float) -> None:
    """The job failed; rank 0 ended itself with rank 1's message, before rank 1 left by itself (so within
    seconds of the failure: its watchdog ended it)."""
    assert code != 0 and "OSError: injected: disk gone at step 2" in stderr, stderr[-3000:]
    assert "vtn: rank 1 failed: OSError: injected: disk gone at step 2 (rank 0 stops too)" in stderr, stderr[-3000:]
    assert seconds < LEAVE_S, seconds


def main() -> int:
    import torch.distributed as dist

    import vtn.temporal.loop as loop_job
    from vtn.cli import main as vtn

    real_set_lr, real_destroy = loop_job.set_lr, dist.destroy_process_group

    def set_lr(loop):
        if loop.procs.rank == 1 and loop.state["step"] == 2:
            with open(os.environ["FAIL_AT"], "w") as f:
                f.write(str(time.time()))
            raise OSError("injected: disk gone at step 2")
        real_set_lr(loop)

    def destroy(*a, **k):
        if dist.get_rank() == 1:
            time.sleep(LEAVE_S)
        real_destroy(*a, **k)

    loop_job.set_lr, dist.destroy_process_group = set_lr, destroy
    return vtn(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
