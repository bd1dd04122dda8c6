"""`python -m dfastllm_ray.serve run CONFIG`: see `launcher.py`."""
import sys

from .launcher import main

sys.exit(main())
