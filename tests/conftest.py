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


@pytest.fixture
def gpu_norm_ways(monkeypatch):
    """The group norms of vpd/norm.py as compiled for a GPU, taken here on the CPU: a list that records the
    `per_channel` of each `group_norm_in_layout` call."""
    from vpd import norm
    calls, in_layout = [], norm.group_norm_in_layout
    monkeypatch.setattr(norm, "compiled_for_gpu", lambda x: True)
    monkeypatch.setattr(norm, "group_norm_in_layout",
                        lambda x, n, per_channel: calls.append(per_channel) or in_layout(x, n, per_channel))
    return calls
