"""examples/ddp_train.py launched for real with torchrun and accelerate launch (gloo, loopback only)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
BIN = Path(sys.executable).parent


def launch(command: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command + [str(SCRIPT), "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def torchrun(n: int, out: Path) -> dict:
    return launch([str(BIN / "torchrun"), "--nnodes", "1", "--nproc_per_node", str(n),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port())], out)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return torchrun(1, tmp_path_factory.mktemp("one") / "result.json")


def assert_matches_single_process(result: dict, single: dict) -> None:
    assert result["world_size"] == 2 and single["world_size"] == 1
    assert result["resample_steps"] == single["resample_steps"] == [3, 6]
    assert result["losses"] == pytest.approx(single["losses"], rel=1e-5)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, single):
    assert_matches_single_process(torchrun(2, tmp_path / "result.json"), single)


@pytest.mark.slow
def test_accelerate_launch_two_processes_match_one(tmp_path, single):
    result = launch([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
                     "--main_process_port", str(free_port())], tmp_path / "result.json")
    assert_matches_single_process(result, single)
