"""Suite-wide settings. One torch thread: the suite shares 2 cores with Ray replicas, and small
CPU matmuls lose more to thread contention than they gain from a second thread. The thread
variables are set before torch loads: pools started with 2 threads and cut to 1 afterwards left
MKL's kernel choice varying, so two same-seed trainings in one process could differ in the last
bit (tests/test_tiny_model.py, dfastllm_ray/train/__main__.py `pin_threads`)."""
import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

torch.set_num_threads(1)
