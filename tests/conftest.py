import os

# Tiny test models run faster on one thread than on several competing for 2 cores; subprocesses
# (torchrun tests) inherit the setting through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
