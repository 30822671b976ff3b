"""The `vtn` CLI run as a test needs it: in this process where it can be, in a fresh one where it must."""

import contextlib
import io
import os
import subprocess
import sys


def run_vtn(*args, check_rc=None, cwd=None, env=None, timeout=None) -> subprocess.CompletedProcess:
    """Run the `vtn` CLI in this process, its stdout and stderr captured: what a user's shell would see, without
    paying torch's and timm's imports again for every command. With `env` or `timeout`, in a fresh process
    instead (libraries read their environment once, at import; a hang must not hang the test session). Tests of
    kills or torchrun start their own processes. check_rc: the exit status it must end with."""
    argv = [str(a) for a in args]
    if env is not None or timeout is not None:
        done = subprocess.run([sys.executable, "-m", "vtn", *argv], capture_output=True, text=True, cwd=cwd, env=env,
                              timeout=timeout)
    else:
        done = _in_process(argv, cwd)
    if check_rc is not None:
        assert done.returncode == check_rc, done.stderr[-3000:]
    return done


def _in_process(argv: list[str], cwd) -> subprocess.CompletedProcess:
    from vtn.cli import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["vtn", *argv], code, out.getvalue(), err.getvalue())
