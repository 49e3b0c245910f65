"""Rank environment from Slurm (srun, one task per GPU), torchrun, or a plain python."""

from __future__ import annotations

import stat

import pytest

from polar_scaling.dist_env import first_host, setup_env, slurm_job_port

RANK_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_scontrol(tmp_path, monkeypatch):
    """A PATH on which scontrol cannot be found (as on a node without Slurm's client)."""
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def slurm_env(procid, ntasks, localid, nodelist="gpu[003-004]", job_id="4242"):
    return {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks),
            "SLURM_LOCALID": str(localid), "SLURM_JOB_NODELIST": nodelist,
            "SLURM_JOB_ID": job_id}


@pytest.mark.parametrize("nodelist,host", [
    ("gpu[003-004]", "gpu003"),
    ("gpu[003-005,007],cpu1", "gpu003"),
    ("gpu[007,003-005]", "gpu007"),
    ("node7", "node7"),
    ("node7,node8", "node7"),
    ("cpu1,gpu[003-004]", "cpu1"),
    ("gpu-a[01-02]", "gpu-a01"),
])
def test_first_host_without_scontrol(no_scontrol, nodelist, host):
    assert first_host(nodelist) == host


def test_first_host_asks_scontrol_when_present(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"
    fake.write_text("#!/bin/sh\necho head-node-from-scontrol\necho other\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert first_host("gpu[003-004]") == "head-node-from-scontrol"


def test_two_nodes_of_eight_gpus_map_every_task(no_scontrol):
    ports = set()
    for procid in range(16):
        env = slurm_env(procid, 16, procid % 8)
        got = setup_env(env)
        assert got["RANK"] == str(procid)
        assert got["WORLD_SIZE"] == "16"
        assert got["LOCAL_RANK"] == str(procid % 8)
        assert got["MASTER_ADDR"] == "gpu003"
        ports.add(got["MASTER_PORT"])
    # every task derives the same port from the job id, without talking to the others
    assert ports == {str(slurm_job_port("4242"))} == {"24242"}


def test_job_port_stays_in_range():
    for job in ("0", "1", "19999", "20000", "987654321", "123_4"):
        assert 20000 <= slurm_job_port(job) < 40000
    assert slurm_job_port("123_4") == slurm_job_port("1234")


def test_torchrun_variables_win_over_slurm(no_scontrol):
    env = {**slurm_env(3, 16, 3), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
           "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"}
    assert setup_env(env) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                              "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"}


def test_explicit_master_is_kept_under_slurm(no_scontrol):
    env = {**slurm_env(0, 4, 0), "MASTER_ADDR": "ib0-gpu003", "MASTER_PORT": "31000"}
    got = setup_env(env)
    assert (got["MASTER_ADDR"], got["MASTER_PORT"]) == ("ib0-gpu003", "31000")


@pytest.mark.parametrize("env", [{}, slurm_env(0, 1, 0)])
def test_single_process_gets_rank_zero_of_one(no_scontrol, env):
    got = setup_env(env)
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"]) == ("0", "1", "0")
    assert got["MASTER_ADDR"] == "127.0.0.1"
    assert 0 < int(got["MASTER_PORT"]) < 65536
    assert all(env[k] == got[k] for k in RANK_KEYS)  # written into the mapping given
