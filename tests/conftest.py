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

# Tests that start their own Ray cluster in a child process (`serve run --address local`, the
# launcher) run first, before the session's cluster (tests/serve/conftest.py) exists: two
# clusters on 2 loaded cores made Ray's own startup time out (tests/serve/app_process.py).
FRESH_CLUSTER = "fresh_cluster"


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker(FRESH_CLUSTER) is None)   # stable
