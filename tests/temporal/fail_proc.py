"""One rank of a 2-process gloo job (`vtn train`, `vtn finetune`, ...) whose rank 1 fails at step 2.

`fail_together(args, folder)` starts both ranks as plain processes with torchrun's environment variables (not
under torchrun, whose agent would kill the other rank itself) and returns, per rank, (exit code, stderr, seconds
from the failure to its end). The failing rank then leaves slowly (LEAVE_S seconds before it closes its process
group, as a rank with stuck loader workers would), so the other rank, blocked in DDP's gradient all-reduce, can
end sooner only through runtime.FailTogether's watchdog.
"""

import os
import socket
import subprocess
import sys
import time

LEAVE_S = 8.0


def fail_together(args: list[str], folder, timeout: float = 240.0) -> list[tuple[int, str, float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "FAIL_AT": str(folder / "failed_at")}
    procs = [subprocess.Popen([sys.executable, __file__, *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    ended = [None, None]
    start = time.monotonic()
    try:
        while None in ended and time.monotonic() - start < timeout:
            for r, p in enumerate(procs):
                if ended[r] is None and p.poll() is not None:
                    ended[r] = time.time()
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed_at = float((folder / "failed_at").read_text())
    return [(p.wait(), p.stderr.read(), (end or float("inf")) - failed_at) for p, end in zip(procs, ended)]


def check_failed_together(ends: list[tuple[int, str, float]]) -> None:
    """Both ranks failed with rank 1's error; rank 0 within seconds, before rank 1 left (its watchdog ended it)."""
    for rank, (code, stderr, _) in enumerate(ends):
        assert code != 0 and "OSError: injected: disk gone at step 2" in stderr, (rank, stderr[-2000:])
    assert "rank 1 failed: OSError: injected" in ends[0][1], ends[0][1][-2000:]
    assert ends[0][2] < LEAVE_S, ends[0][2]
    assert ends[1][2] < LEAVE_S + 15, ends[1][2]


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
