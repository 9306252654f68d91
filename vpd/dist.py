"""Process setup in one place: the device, torch.distributed (one script runs under `python` and under
`torchrun`), autocast and the output folder."""
import atexit
import os
from contextlib import nullcontext, suppress

import torch
import torch.distributed as dist


def setup(device_arg="auto"):
    """Initialise DDP when launched by torchrun (RANK set); return (rank, world, device): on a GPU,
    cuda:LOCAL_RANK, the GPU of this process on its node."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu, cuda or auto, not {device_arg!r}")
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_arg)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device_arg == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return rank, world, device


def resolve_amp(amp, device):
    """--amp bf16 / fp16 / off as given; None is bf16 on a GPU and off on a CPU (where bf16 is slower)."""
    return amp or ("bf16" if device.type == "cuda" else "off")


def amp_autocast(amp, device):
    """A factory of autocast contexts for --amp (resolve_amp). With autocast on a GPU, float32 matrix products
    also run on TF32 tensor cores, not on the CUDA cores (some 8x slower): the only ones left under autocast
    are resize_bilinear's, whose logits are bf16 (or fp16) values, held exactly by TF32's 10-bit mantissa, as
    are the x8 upsampling's weights (sixteenths); other ratios' weights round to 10 bits (relative 5e-4, an
    eighth of a bf16 step). Convolutions take TF32 in float32 already (cudnn.allow_tf32 is on by default)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[resolve_amp(amp, device)]
    if dtype and device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext


def writable_dir(path):
    """Create `path` and check that this process can write in it, before minutes of model loading. Every
    rank checks (nodes may mount it differently), each with its own probe file. A folder made for this
    command is removed again as rank 0 (the one that writes the outputs) exits, if nothing was written into
    it: a command that fails later, such as a model that does not load, leaves no empty folder behind."""
    if os.path.isfile(path):
        raise SystemExit(f"--out {path} is a file, not a folder")
    if rank() == 0 and not os.path.exists(path):
        atexit.register(_remove_if_empty, path)
    barrier()  # rank 0 has looked before any rank makes it
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test{os.environ.get('RANK', 0)}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"--out {path} is not writable: {e}") from None


def _remove_if_empty(path):
    with suppress(OSError):  # not empty (os.rmdir refuses it), or gone already
        os.rmdir(path)


def is_dist():
    return dist.is_available() and dist.is_initialized()


def barrier():
    if is_dist():
        dist.barrier()


def teardown():
    if is_dist():
        dist.destroy_process_group()


def broadcast_buffers(module, src=0):
    """Every rank takes rank `src`'s buffers. BatchNorm statistics drift apart across ranks (each
    updates them with its own batch, and DDP syncs them only at the start of a forward); an evaluation
    spread over ranks must score the model that is saved: rank 0's."""
    if is_dist():
        for b in module.buffers():
            dist.broadcast(b, src)


def mean_over_ranks(x: float, device) -> float:
    """Average a Python float over ranks (the logged loss is the global batch's, not rank 0's)."""
    if not is_dist():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()


def gather_objects(obj):
    """Every rank's `obj`, as a list in rank order (a one-element list without DDP)."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank():
    return dist.get_rank() if is_dist() else 0


def world_size():
    return dist.get_world_size() if is_dist() else 1
