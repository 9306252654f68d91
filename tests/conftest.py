import os

# Tiny test models run faster on one thread than on several competing for 2 cores; subprocesses
# (torchrun tests) inherit the setting through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from contextlib import contextmanager  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402


@pytest.fixture
def resize_uncounted():
    """A context manager within which the task models resize their logits (and the FPN head its levels) with
    F.interpolate, whose work FlopCounterMode does not count, in place of vpd.heads.resize_bilinear's two
    matrix products, which it would: FLOP checks count the networks' work and leave resampling out, as
    vpd/flops.py does."""
    import vpd.heads
    import vpd.model

    def interpolate(x, size, align_corners=False):
        return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=align_corners)

    @contextmanager
    def patched():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(vpd.model, "resize_bilinear", interpolate)
            mp.setattr(vpd.heads, "resize_bilinear", interpolate)  # the FPN head's x2 upsamples
            yield
    return patched
