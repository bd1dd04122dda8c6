"""Suite-wide settings. One torch thread: the suite shares 2 cores with Ray replicas, and small
CPU matmuls lose more to thread contention than they gain from a second thread."""
import torch

torch.set_num_threads(1)
