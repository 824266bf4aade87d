"""SLURM task variables -> torchrun's (engine/slurm.py): what each task of a job step learns."""

from __future__ import annotations

import pytest

from kd_cli.engine.slurm import PORT_BASE, adopt_slurm_tasks, first_host

STEP = {
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_NODELIST": "gpu[03-06]",
    "SLURM_JOB_ID": "123456",
}


def test_a_task_of_a_step_gets_its_rank_world_and_rendezvous():
    env = dict(STEP)
    assert adopt_slurm_tasks(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert env["MASTER_ADDR"] == "gpu03" and env["MASTER_PORT"] == str(PORT_BASE + 123456 % 10000)


@pytest.mark.parametrize(
    "env",
    [
        {**STEP, "RANK": "0", "WORLD_SIZE": "2"},  # torchrun's own variables win
        {**STEP, "SLURM_STEP_NUM_TASKS": "1"},  # a single task trains alone
        {k: v for k, v in STEP.items() if k != "SLURM_STEP_NUM_TASKS"},  # an allocation's shell, not a step
        {**STEP, "KD_SLURM_DDP": "0"},  # switched off
    ],
)
def test_left_alone_when_not_one_of_several_tasks(env):
    before = dict(env)
    assert not adopt_slurm_tasks(env)
    assert env == before


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("gpu[03-06]", "gpu03"),
        ("gpu[07,09]", "gpu07"),
        ("cn001,cn002", "cn001"),
        ("a[1-2],b[3-4]", "a1"),
        ("node17", "node17"),
        ("", "127.0.0.1"),
    ],
)
def test_the_first_host_of_a_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_master_address_and_port_given_are_kept():
    env = {**STEP, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
    adopt_slurm_tasks(env)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.1", "29400")
