"""SLURM: an array task takes its share of the videos from the environment (--shard wins), and the tasks of an
`srun` step get torchrun's rank variables from SLURM's."""

import pytest

from vtn.errors import UserError
from vtn.runtime import slurm_array_shard, slurm_ranks
from vtn.store import open_cache

ARGS = ["--backbone", "resnet18", "--random-init", "--image-size", "32", "--num-frames", "4", "--workers", "0", "--quiet"]
ARRAY = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_STEP")


def test_array_task_3_of_8_extracts_the_share_of_shard_3_of_8(videos, tmp_path, vtn, monkeypatch):
    for key in ARRAY:
        monkeypatch.delenv(key, raising=False)
    by_flag = tmp_path / "flag"
    vtn("extract", videos, "--out", by_flag, *ARGS, "--shard", "3/8", check_rc=0)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")  # --array=1-8: the fourth task is share 3 of 8
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    by_env = tmp_path / "env"
    out = vtn("extract", videos, "--out", by_env, *ARGS, check_rc=0).stdout
    assert out.splitlines()[0] == ("vtn extract: shard 3/8 from the SLURM array task (SLURM_ARRAY_TASK_ID=4, "
                                   "SLURM_ARRAY_TASK_MIN=1, SLURM_ARRAY_TASK_COUNT=8)")
    ids = open_cache(str(by_env)).ids
    assert len(ids) and sorted(ids) == sorted(open_cache(str(by_flag)).ids)

    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")  # share 5 by the environment, but --shard says 3/8: nothing new
    out = vtn("extract", videos, "--out", by_env, *ARGS, "--shard", "3/8", check_rc=0).stdout
    assert "SLURM" not in out and sorted(open_cache(str(by_env)).ids) == sorted(ids)


def test_array_shares_with_a_step_and_outside_an_array():
    env = {"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "5",
           "SLURM_ARRAY_TASK_STEP": "2"}  # --array=10-18:2
    assert slurm_array_shard(env)[0] == (2, 5)
    assert slurm_array_shard({"SLURM_JOB_ID": "7"}) is None
    with pytest.raises(UserError, match="--shard"):
        slurm_array_shard({**env, "SLURM_ARRAY_TASK_ID": "15"})


def test_srun_tasks_get_torchrun_ranks_from_slurm():
    step = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "6", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
            "SLURM_STEP_TASKS_PER_NODE": "2(x2),2"}
    assert slurm_ranks(step) == {"RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert slurm_ranks({**step, "SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_NODEID": "1"})["LOCAL_WORLD_SIZE"] == "1"
    assert slurm_ranks({**step, "RANK": "0"}) == {}  # torchrun's own variables win
    assert slurm_ranks({**step, "SLURM_STEP_NUM_TASKS": "1"}) == {}  # one task: no process group
    # A batch script sees its allocation's task count but runs as one process
    assert slurm_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == {}
