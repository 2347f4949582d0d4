"""Multi-host bring-up decisions and the --tpu message off a TPU VM."""

import pytest

from neo.distributed import how_to_launch, initialize, on_tpu_vm, slurm_job
from neo.errors import NeoError


def test_tpu_flag_off_a_tpu_vm_says_how_to_launch():
    if on_tpu_vm():
        pytest.fail("the test machine has TPU devices attached")
    with pytest.raises(NeoError) as e:
        initialize("my-pod", env={})
    text = str(e.value)
    assert "not a Cloud TPU VM" in text and "scripts/tpu_run.sh my-pod --zone ZONE" in text
    assert "gcloud compute tpus tpu-vm ssh my-pod" in text and "--worker=all" in text


def test_launch_command_repeats_the_users_command():
    text = how_to_launch("v3", ["main.py", "--model", "my cfg.json", "--tpu", "v3"])
    assert "python main.py --model 'my cfg.json' --tpu v3" in text


def test_slurm_detection():
    assert slurm_job({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})
    assert not slurm_job({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})
    assert not slurm_job({})
    assert on_tpu_vm({"TPU_ACCELERATOR_TYPE": "v4-8"})
