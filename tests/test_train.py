"""train.py end to end on a tiny random model and the synthetic world: loss falls, DDP = accumulation,
exact resume, AMP / compile, distributed eval, rank-0-only output, clear errors on bad input."""
import glob
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file

import eval as eval_script
import train
from vpd.demo import write_random_sd
from vpd.synthetic import make_synthetic
from vpd.trained import read_meta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)  # OMP_NUM_THREADS comes from conftest.py
STEPS = 16  # optimizer steps of the loss / resume runs
LOSS_CROP = {"depth": 64, "semseg": 64, "refer": 64}  # the loss runs' crops; other depth runs use 32
LOSS_RUN = ["--iters", STEPS, "--batch-size", 4, "--lr", 2e-3, "--log-every", 2]  # a log line per 2 steps


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random SD file and a small synthetic dataset per task, shared by every run here."""
    base = tmp_path_factory.mktemp("train")
    sd = write_random_sd(str(base / "sd.safetensors"))
    roots = {t: make_synthetic(str(base / f"data_{t}"), t, n, size=size)
             for t, n, size in (("depth", 16, 96), ("semseg", 10, 64), ("refer", 10, 64))}
    return dict(base=base, sd=sd, roots=roots, runs={})


def flags(world, task, out, *extra, crop=None):
    crop = crop or (32 if task == "depth" else 64)
    return ["--demo", "--task", task, "--sd-ckpt", world["sd"], "--data-root", world["roots"][task], "--out", str(out),
            "--text-cache", str(world["base"] / "text_cache"), "--crop", str(crop), "--workers", "0",
            "--log-every", "1", "--eval-max", "3", "--seed", "0", *map(str, extra)]


def train_here(argv):
    train.main(train.get_args(argv))


def records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return [(r["step"], r["loss"], r["lr"]) for r in records(out) if "loss" in r]


def params(out):
    """The saved trained weights without batch-norm statistics (those follow rank 0's micro-batches
    under DDP, all micro-batches under accumulation: by design not comparable)."""
    state = load_file(os.path.join(out, "model.safetensors"))
    return {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def loss_run(world, task):
    """One uninterrupted run per task, shared by the loss and resume tests."""
    if task not in world["runs"]:
        out = world["base"] / f"run_{task}"
        train_here(flags(world, task, out, *LOSS_RUN, crop=LOSS_CROP[task]))
        world["runs"][task] = out
    return world["runs"][task]


@pytest.mark.parametrize("task", ["depth", "semseg", "refer"])
def test_loss_falls(world, task):
    out = loss_run(world, task)
    rec = losses(out)
    assert [s for s, _, _ in rec] == list(range(2, STEPS + 1, 2))
    first, last = [sum(l for _, l, _ in rec[i]) / 2 for i in (slice(0, 2), slice(-2, None))]  # 4 steps each
    assert last < 0.8 * first, (task, [round(l, 3) for _, l, _ in rec])
    evals = [r for r in records(out) if "loss" not in r]
    assert len(evals) == 1 and evals[0]["step"] == STEPS
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["step"] == STEPS and "baseline" in metrics  # the demo compares with a trivial predictor
    assert os.path.getsize(os.path.join(out, "curves.png")) > 0
    assert not any(k.startswith(("_orig_mod.", "module.", "backbone.vae.", "clip.")) for k in load_file(
        os.path.join(out, "model.safetensors")))  # frozen VAE / CLIP come from the SD file


def test_resume_reproduces_the_uninterrupted_run(world):
    # semseg: its head has dropout, so the resumed RNG streams matter too. Stopping at step 7 of
    # 2-step epochs (8 training images, batch 4) and 2-step log windows resumes mid-epoch and
    # mid-window: the data order, the dropout RNG and the half-summed loss must all carry over.
    ref = loss_run(world, "semseg")
    out = world["base"] / "resumed"
    args = flags(world, "semseg", out, *LOSS_RUN, crop=LOSS_CROP["semseg"])
    train_here(args + ["--stop-after", "7"])
    assert [s for s, _, _ in losses(out)] == [2, 4, 6]
    assert not os.path.exists(os.path.join(out, "metrics.json"))  # stopped before the end: no eval
    with open(os.path.join(out, "log.jsonl"), "a") as f:  # a line a crashed run wrote after its checkpoint
        f.write(json.dumps(dict(step=8, loss=123.0, lr=0.0)) + "\n")
        f.write('{"step": 9, "loss": 1')  # and the torn end of a line it was writing when killed
    # an evaluation at step 14 (the reference has none) must leave the RNG streams of steps 15-16 alone
    train_here(args + ["--resume", "--eval-every", "14"])
    assert [r["step"] for r in records(out) if "loss" not in r] == [14, 16]
    assert losses(out) == losses(ref)
    a, b = params(out), params(ref)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_auto_resume_starts_the_run_then_continues_it(world, tmp_path, capsys):
    # one command for a job a scheduler may stop and requeue: a new run where --out holds no checkpoint,
    # a resumed one where it does, and nothing to do once the run is complete
    out = tmp_path / "run"
    args = flags(world, "depth", out, "--iters", 4, "--batch-size", 2, "--eval-max", 1, "--auto-resume")
    train_here(args + ["--stop-after", "2"])
    assert [s for s, _, _ in losses(out)] == [1, 2]
    assert "--auto-resume: no checkpoint yet in" in capsys.readouterr().out
    train_here(args)
    assert [s for s, _, _ in losses(out)] == [1, 2, 3, 4]
    assert f"--auto-resume: continuing the run in {out}" in capsys.readouterr().out
    train_here(args)
    assert "is complete (step 4, evaluated): nothing to do" in capsys.readouterr().out


def test_resume_takes_the_flags_left_out_from_the_run(world, tmp_path):
    # `--resume --out DIR` alone continues the run as it was started (not with the demo's presets, 300
    # steps of 8); the flags of speed and hardware are as given
    out = tmp_path / "run"
    started = flags(world, "depth", out, "--iters", 4, "--batch-size", 2, "--eval-max", 1, "--lr", "2e-3")
    train_here(started + ["--stop-after", "2"])
    train_here(["--resume", "--out", str(out), "--workers", "0"])
    assert [s for s, _, _ in losses(out)] == [1, 2, 3, 4]
    ran = torch.load(out / "state.pt", weights_only=False)["args"]
    first = train.get_args(started)
    assert all(ran[k] == getattr(first, k) for k in train.FROM_RUN if k not in ("amp", "micro_batch")), ran
    assert (ran["amp"], ran["micro_batch"]) == ("off", 2)  # as resolved on this CPU for 1 process
    with pytest.raises(SystemExit, match="--resume: give --out, the run's folder"):
        train.get_args(["--resume"])
    with pytest.raises(SystemExit, match=f"--resume: {out} holds a depth run, not semseg"):
        train.get_args(["--resume", "--out", str(out), "--task", "semseg"])


def test_resume_derives_again_what_the_run_derived(world, tmp_path, monkeypatch):
    # the demo's own SD file in its --out: a run moved elsewhere takes the one in its new folder, not the
    # old path; a micro-batch of batch / processes is derived again, so the messages name what differs
    import shutil
    from vpd import dist
    argv = flags(world, "depth", tmp_path / "run", "--iters", 3, "--batch-size", 2, "--eval-max", 1)
    i = argv.index("--sd-ckpt")
    train_here(argv[:i] + argv[i + 2:] + ["--stop-after", "1"])
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "run", moved)
    with pytest.raises(SystemExit, match=r"started with --batch-size 2 \(not 4\); pass the same values$"):
        train_here(["--resume", "--out", str(moved), "--batch-size", "4"])
    with monkeypatch.context() as m:
        m.setattr(dist, "setup", lambda device: (0, 2, torch.device("cpu")))
        with pytest.raises(SystemExit, match="was written by 1 processes, this run has 2: launch it with 1"):
            train_here(["--resume", "--out", str(moved)])
    train_here(["--resume", "--out", str(moved), "--workers", "0"])
    ran = torch.load(moved / "state.pt", weights_only=False)
    assert ran["step"] == 3 and ran["args"]["sd_ckpt"] == str(moved / "tiny_sd.safetensors")


def test_resume_restores_the_grad_scaler(world, tmp_path, monkeypatch):
    # fp16's loss scale is training state: a resumed run goes on from the scaler state.pt saved (here a
    # stand-in scaler that counts its steps: real fp16 autocast takes seconds per step on a CPU)
    class CountingScaler:
        def __init__(self, device, enabled=True):
            self.steps = 0

        def scale(self, loss):
            return loss

        def step(self, optimizer):
            optimizer.step()
            self.steps += 1

        def update(self):
            pass

        def state_dict(self):
            return {"steps": self.steps}

        def load_state_dict(self, state):
            self.steps = state["steps"]
    monkeypatch.setattr(torch.amp, "GradScaler", CountingScaler)
    args = flags(world, "depth", tmp_path / "run", "--iters", 4, "--batch-size", 2, "--eval-max", 1)
    train_here(args + ["--stop-after", "2"])
    train_here(args + ["--resume"])
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=False)["scaler"] == {"steps": 4}


def torchrun(script, argv, log_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--redirects", "3", "--log-dir", str(log_dir), script, *argv]
    for attempt in range(2):  # a port taken by another job on the machine between pick and bind: once more
        p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        if p.returncode == 0 or "address already in use" not in (p.stdout + p.stderr).lower():
            break
    logs = "".join(open(f).read()[-2000:] for f in glob.glob(os.path.join(str(log_dir), "**", "*.log"), recursive=True))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:] + logs

    def read(rank, stream):
        paths = glob.glob(os.path.join(str(log_dir), "**", str(rank), f"{stream}.log"), recursive=True)
        return open(max(paths, key=os.path.getmtime)).read()  # the last attempt's
    return read


def test_ddp_equals_accumulation_and_distributed_eval(world):
    """2 processes x 1 micro-batch of 2 == 1 process x 2 accumulated micro-batches of 2, to float
    tolerance; the 2-process eval (odd sample count) equals the 1-process one; only rank 0 prints."""
    common = ["--iters", 3, "--batch-size", 4, "--micro-batch", 2, "--eval-max", 3]
    one = world["base"] / "one_process"
    train_here(flags(world, "depth", one, *common))
    two = world["base"] / "two_processes"
    read = torchrun("train.py", flags(world, "depth", two, *common), world["base"] / "logs_train")

    a, b = params(one), params(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    for (s1, l1, r1), (s2, l2, r2) in zip(losses(one), losses(two), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4) and r1 == r2  # the loss of the global batch

    assert "step 3" in read(0, "stdout") and "3/3" in read(0, "stderr")  # rank 0: metrics and the bar
    assert read(1, "stdout") == "" and "%|" not in read(1, "stderr")  # no bar, no print on rank 1

    # eval.py on the 2-process checkpoint: 1 process, then 2 (3 samples: 2 on rank 0, 1 on rank 1)
    ckpt = str(two / "model.safetensors")
    ev = ["--ckpt", ckpt, "--max-samples", 3, "--workers", 0]
    eval_script.main(eval_script.get_args([str(x) for x in ev + ["--out", world["base"] / "eval1"]]))
    read = torchrun("eval.py", [str(x) for x in ev + ["--out", world["base"] / "eval2"]], world["base"] / "logs_eval")
    assert read(1, "stdout") == ""
    m1 = json.load(open(world["base"] / "eval1" / "metrics_nyu_test_first3.json"))
    m2 = json.load(open(world["base"] / "eval2" / "metrics_nyu_test_first3.json"))
    m_train = json.load(open(two / "metrics.json"))
    assert m1["samples"] == m2["samples"] == 3 and m1["split"] == "test" and m1["flip"] is True
    for k in ("d1", "abs_rel", "rmse", "silog"):
        assert m2[k] == pytest.approx(m1[k], rel=1e-9) and m_train[k] == pytest.approx(m1[k], rel=1e-6)


def test_compiled_ddp_with_accumulation_equals_one_eager_process(world):
    """train.py's DDP around the compiled model, with accumulation (no_sync on the first micro-batch of each
    step), as on a GPU cluster with --compile: 2 processes x 2 accumulated micro-batches of 1 == 1 eager process
    x 4 of 1. aot_eager compiles through the same graph capture and DDP split as inductor, without a C++ compiler."""
    common = ["--iters", 2, "--batch-size", 4, "--micro-batch", 1, "--eval-max", 1]
    one = world["base"] / "one_eager_accum4"
    train_here(flags(world, "depth", one, *common))
    two = world["base"] / "two_compiled_accum2"
    read = torchrun("train.py", flags(world, "depth", two, *common, "--compile", "aot_eager"),
                    world["base"] / "logs_compiled")
    assert "--compile aot_eager: the first step compiles" in read(0, "stdout")
    assert "2 processes x 1 x 2 accumulation" in read(0, "stdout")
    a, b = params(one), params(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    for (s1, l1, r1), (s2, l2, r2) in zip(losses(one), losses(two), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4) and r1 == r2


def test_distributed_evaluation_in_training_scores_the_saved_model(world):
    # the semseg head's BatchNorm statistics differ across ranks after a step (each updates them with its
    # own batch): the evaluation after training, spread over both ranks, must score rank 0's saved model
    out = world["base"] / "two_semseg"
    torchrun("train.py", flags(world, "semseg", out, "--iters", 3, "--batch-size", 4), world["base"] / "logs_semseg")
    eval_script.main(eval_script.get_args(["--ckpt", str(out / "model.safetensors"), "--max-samples", "3",
                                           "--workers", "0", "--out", str(out / "eval")]))
    (path,) = glob.glob(str(out / "eval" / "metrics_ade20k_validation*.json"))
    by_eval, in_training = json.load(open(path)), json.load(open(out / "metrics.json"))
    assert in_training["samples"] == by_eval["samples"]
    assert in_training["mIoU"] == pytest.approx(by_eval["mIoU"], rel=1e-9)


@pytest.mark.parametrize("flag, ran", [([], (None, False, False, False)),
                                       (["--amp", "bf16"], (torch.bfloat16, False, False, False)),
                                       (["--compile", "aot_eager"], (None, True, True, False)),
                                       (["--grad-checkpoint"], (None, False, False, True))])
def test_amp_compile_grad_checkpoint_run(world, flag, ran, monkeypatch):
    seen = []

    def recording(model, loss, task, batch):  # what the training step actually ran under: autocast, compiled
        # model, compiled loss, checkpointing
        seen.append((torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
                     hasattr(model, "_orig_mod"), hasattr(loss, "_torchdynamo_orig_callable"),
                     getattr(model, "_orig_mod", model).backbone.unet.grad_checkpointing))
        return forward_loss(model, loss, task, batch)
    forward_loss = train.forward_loss
    monkeypatch.setattr(train, "forward_loss", recording)
    out = world["base"] / f"flag{flag[-1].strip('-') if flag else ''}"
    train_here(flags(world, "depth", out, "--iters", 2, "--batch-size", 2, "--eval-max", 1, *flag))
    rec = losses(out)
    assert seen == [ran] * 2
    assert len(rec) == 2 and all(l == l and l < 10 for _, l, _ in rec)
    assert not any(k.startswith("_orig_mod.") for k in load_file(os.path.join(out, "model.safetensors")))


def test_compile_mode_reaches_torch_compile(world, monkeypatch, capsys):
    # inductor itself needs a C++ compiler here: the mode is recorded, the model compiled with aot_eager
    seen, compile_ = [], torch.compile

    def recording(fn, backend, mode=None):
        seen.append((getattr(fn, "__name__", type(fn).__name__), backend, mode))
        return compile_(fn, backend="aot_eager")
    monkeypatch.setattr(torch, "compile", recording)
    out = world["base"] / "compile_mode"
    train_here(flags(world, "depth", out, "--iters", 1, "--batch-size", 2, "--eval-max", 1,
                     "--compile", "--compile-mode", "reduce-overhead"))
    # the loss compiled apart, without CUDA graphs: a few kernels
    assert seen == [("VPDDepth", "inductor", "reduce-overhead"), ("loss", "inductor", None)] and len(losses(out)) == 1
    assert "CUDA graphs need a GPU; on cpu the model is compiled without them" in capsys.readouterr().out


def test_channels_last_trains_the_same(world, monkeypatch):
    # a layout change only: the same losses up to the convolution kernels' summation order
    layouts = []

    def recording(model, loss, task, batch):  # the layout the training step actually ran in
        layouts.append(all(m.weight.is_contiguous(memory_format=torch.channels_last)
                           for m in model.modules() if isinstance(m, torch.nn.Conv2d)))
        return forward_loss(model, loss, task, batch)
    forward_loss = train.forward_loss
    monkeypatch.setattr(train, "forward_loss", recording)
    outs = [world["base"] / f"layout{i}" for i in range(2)]
    for out, extra in zip(outs, ([], ["--channels-last"])):
        train_here(flags(world, "semseg", out, "--iters", 3, "--batch-size", 2, "--eval-max", 1, *extra))
    assert layouts == [False] * 3 + [True] * 3
    a, b = [[l for _, l, _ in losses(out)] for out in outs]
    assert len(a) == 3 and a == pytest.approx(b, rel=1e-4)
    assert params(outs[1]).keys() == params(outs[0]).keys()


# ----------------------------------------------------------------------------- bad input

def bad_cases(world, tmp):
    """(argv, words the error must contain) for each kind of bad input."""
    depth_ckpt = str(loss_run(world, "depth") / "model.safetensors")
    empty = tmp / "empty"
    empty.mkdir()
    a_file = tmp / "a_file"
    a_file.write_text("x")
    a_pth = tmp / "notes.pth"  # a .pth that is no torch file: said so, not "--task is required"
    a_pth.write_text("not a model")
    sd = world["sd"]
    photo = sorted(glob.glob(os.path.join(world["roots"]["depth"], "official_splits", "test", "*", "rgb_*.jpg")))[0]
    moved = str(tmp / "moved.safetensors")  # a demo model whose synthetic data has moved since
    meta = dict(read_meta(depth_ckpt), data_root=str(tmp / "gone"))
    save_file(load_file(depth_ckpt), moved, {"vpd": json.dumps(meta)})
    return {
        "task": (["train.py", "--task", "segmentation"], ["invalid choice", "segmentation"]),
        "ckpt of another task": (["eval.py", "--task", "semseg", "--ckpt", depth_ckpt], ["depth model, not semseg"]),
        "data layout": (["train.py", "--task", "depth", "--sd-ckpt", sd, "--data-root", str(empty), "--out",
                         str(tmp / "o1")], ["does not hold the depth data", "NYUv2"]),
        "sd file": (["train.py", "--task", "depth", "--sd-ckpt", str(tmp / "nope.safetensors"), "--data-root",
                     str(empty), "--out", str(tmp / "o2")], ["nope.safetensors", "Download Stable Diffusion"]),
        "out": (flags(world, "depth", a_file / "out"), ["not writable"]),
        "compile mode": (flags(world, "depth", tmp / "o3", "--compile", "aot_eager", "--compile-mode",
                               "reduce-overhead"), ["--compile-mode", "inductor"]),
        "resume nothing": (flags(world, "depth", empty, "--resume"), ["no checkpoint to resume from"]),
        "resume other task": (flags(world, "semseg", loss_run(world, "depth"), "--resume"), ["holds a depth run"]),
        "eval ckpt": (["eval.py", "--ckpt", str(tmp / "missing.safetensors")], ["missing.safetensors", "no such file"]),
        "eval garbage": (["eval.py", "--ckpt", str(a_file) + ".safetensors"], ["not a readable"]),
        "eval not a ckpt": (["eval.py", "--ckpt", str(a_file)], ["not a checkpoint"]),
        "predict text as ckpt": (["predict.py", "--ckpt", str(a_pth), photo], ["not a file torch.save wrote"]),
        "predict sd as ckpt": (["predict.py", "--ckpt", sd, photo], ["is a Stable Diffusion checkpoint",
                                                                     "what --sd-ckpt takes"]),
        "eval moved demo data": (["eval.py", "--ckpt", moved], [f"the demo's data {tmp / 'gone'}", "--data-root"]),
        "sd folder": (["train.py", "--task", "depth", "--sd-ckpt", str(empty), "--data-root", str(empty), "--out",
                       str(tmp / "o4")], [f"--sd-ckpt {empty} is a folder"]),
        "predict sd file": (["predict.py", "--ckpt", depth_ckpt, "--sd-ckpt", depth_ckpt, photo, "--out",
                             str(tmp / "o5")], ["is a trained VPD model (what --ckpt takes)"]),
    }


def test_bad_input_is_a_clear_error(world, tmp_path):
    (tmp_path / "a_file.safetensors").write_text("not safetensors")
    cases = bad_cases(world, tmp_path)
    procs = {}
    for name, (argv, _) in cases.items():
        argv = argv if argv[0].endswith(".py") else ["train.py", *argv]
        procs[name] = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode != 0, name
        assert "Traceback" not in err, (name, err[-2000:])
        for word in cases[name][1]:
            assert word in err, (name, word, err[-2000:])
    # no empty output folder left behind, also where the error came after it was made (the model's files)
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o4", "o5", "eval"))


def test_class_embeddings_file_is_the_models_text(world, tmp_path, capsys):
    from vpd.demo import TINY_UNET
    emb = torch.randn(150, TINY_UNET.context_dim)
    torch.save(emb, tmp_path / "class_embeddings.pth")
    out = tmp_path / "run"
    train_here(flags(world, "semseg", out, "--iters", 3, "--stop-after", 1, "--batch-size", 2, "--class-embeddings",
                     tmp_path / "class_embeddings.pth"))
    assert torch.equal(load_file(str(out / "model.safetensors"))["class_embeddings"], emb)
    # a resume that leaves the flag out goes on with the run's file, and records it: a later resume with it matches
    train_here(flags(world, "semseg", out, "--iters", 3, "--stop-after", 2, "--batch-size", 2, "--resume"))
    assert torch.load(out / "state.pt", weights_only=False)["args"]["class_embeddings"] == str(
        tmp_path / "class_embeddings.pth")
    torch.save(emb + 1, tmp_path / "other.pth")  # --resume with another text: refused
    with pytest.raises(SystemExit, match=r"other.pth holds other text embeddings than the run in .* started with "
                                         r"\(.*class_embeddings.pth\)"):
        train_here(flags(world, "semseg", out, "--iters", 3, "--batch-size", 2, "--class-embeddings",
                         tmp_path / "other.pth", "--resume"))
    torch.save(emb + 1, tmp_path / "class_embeddings.pth")  # other text in the run's own file: refused too
    with pytest.raises(SystemExit, match=r"--class-embeddings .*class_embeddings.pth holds other text embeddings"):
        train_here(flags(world, "semseg", out, "--iters", 3, "--batch-size", 2, "--resume"))
    torch.save(emb, tmp_path / "class_embeddings.pth")
    torch.save(emb, tmp_path / "copy.pth")  # the same text at another path: taken, and recorded
    with pytest.raises(SystemExit, match=r"^--stop-after 2: the run in .* is already at step 2; give a later step"):
        train_here(flags(world, "semseg", out, "--iters", 3, "--stop-after", 2, "--batch-size", 2, "--resume"))
    train_here(flags(world, "semseg", out, "--iters", 3, "--batch-size", 2, "--class-embeddings",
                     tmp_path / "copy.pth", "--resume"))
    assert "copy.pth in place of" in capsys.readouterr().out
    train_here(flags(world, "semseg", out, "--iters", 3, "--batch-size", 2, "--class-embeddings",
                     tmp_path / "class_embeddings.pth", "--resume"))
    assert torch.equal(load_file(str(out / "model.safetensors"))["class_embeddings"], emb)
    torch.save(emb[:27], tmp_path / "nyu.pth")  # 27 rows: a depth file, not ADE20K's 150 classes
    with pytest.raises(SystemExit, match=r"nyu.pth: class embeddings must be a \(150, 32\) float tensor"):
        train_here(flags(world, "semseg", tmp_path / "bad", "--iters", 1, "--class-embeddings", tmp_path / "nyu.pth"))
    with pytest.raises(SystemExit):
        train_here(flags(world, "refer", tmp_path / "refer", "--class-embeddings", tmp_path / "nyu.pth"))
    assert "--class-embeddings is for semseg and depth" in capsys.readouterr().err


# ----------------------------------------------------------------------------- weight files

class Toy(torch.nn.Module):
    def __init__(self, width=3):
        super().__init__()
        self.backbone = torch.nn.Module()
        self.backbone.vae = torch.nn.Linear(2, 2)  # frozen part: not saved
        self.head = torch.nn.Linear(2, width)


def test_a_save_cut_short_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import vpd.trained
    path = tmp_path / "state.pt"
    vpd.trained.save_state({"step": 1}, str(path))

    def torn(obj, f):  # half the file written, then Ctrl-C (or a full disk)
        open(f, "wb").write(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(vpd.trained.torch, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        vpd.trained.save_state({"step": 2}, str(path))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["state.pt"] and torch.load(path)["step"] == 1


def test_the_demo_baseline_does_not_depend_on_where_the_run_stopped(world, tmp_path):
    # the mean depth is fitted to augmented samples: to the first epoch's, not to the epoch the dataset
    # was left in (a run resumed only to redo its last evaluation has not been through any)
    out = tmp_path / "run"
    train_here(flags(world, "depth", out, "--iters", 6, "--batch-size", 4, "--eval-max", 2))  # ends in epoch 1
    first = json.load(open(out / "metrics.json"))
    os.remove(out / "metrics.json")  # killed in the final evaluation
    train_here(flags(world, "depth", out, "--iters", 6, "--batch-size", 4, "--eval-max", 2, "--resume"))
    assert json.load(open(out / "metrics.json"))["baseline"] == first["baseline"]


def test_resume_says_when_the_log_is_gone(world, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--iters", 2, "--batch-size", 2, "--save-every", 1, "--eval-max", 1]
    train_here(flags(world, "depth", out, *common, "--stop-after", 1))
    os.remove(out / "log.jsonl")
    train_here(flags(world, "depth", out, *common, "--resume"))
    assert f"{out / 'log.jsonl'} is missing: the log (and curves.png) restarts at step 2" in capsys.readouterr().out


def test_a_run_removes_the_temporaries_of_a_save_killed_outright(world, tmp_path):
    # kill -9 in a save leaves state.pt.tmp<pid> (the optimizer state: GBs); the next run in --out removes it
    out = tmp_path / "run"
    out.mkdir()
    for name in ("state.pt.tmp123", "model.safetensors.tmp123"):
        (out / name).write_bytes(b"half")
    train_here(flags(world, "depth", out, "--iters", 1, "--batch-size", 2, "--eval-max", 1))
    assert not [n for n in os.listdir(out) if ".tmp" in n] and (out / "state.pt").is_file()


def test_saved_files_take_the_modes_of_the_users_umask(tmp_path):
    # safetensors writes 0600 files: a group sharing a cluster could not read the weights
    from vpd.trained import save_state, save_weights
    old = os.umask(0o027)
    try:
        save_weights(Toy(), str(tmp_path / "w.safetensors"), {"task": "depth"})
        save_state({"step": 1}, str(tmp_path / "state.pt"))
    finally:
        os.umask(old)
    assert {oct(os.stat(tmp_path / n).st_mode & 0o777) for n in ("w.safetensors", "state.pt")} == {oct(0o640)}


def test_a_save_reaches_the_disk_before_its_name_does(tmp_path, monkeypatch):
    # after a power cut, a rename persisted ahead of the data would leave the checkpoint's name on an
    # empty file: the temporary is flushed first
    import vpd.trained
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", os.path.getsize(tmp_path / next(
        n for n in os.listdir(tmp_path) if ".tmp" in n)))))
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", os.path.basename(b))), replace(a, b)))
    vpd.trained.save_state({"step": 1}, str(tmp_path / "state.pt"))
    assert [c[0] for c in calls] == ["fsync", "replace"] and calls[0][1] > 0 and calls[1][1] == "state.pt"


def test_weights_file_holds_trained_parts_and_checks_shapes(tmp_path):
    from vpd.trained import load_weights, read_meta, save_weights
    path = str(tmp_path / "w.safetensors")
    src = Toy()
    save_weights(src, path, {"task": "depth"})
    assert sorted(load_file(path)) == ["head.bias", "head.weight"] and read_meta(path) == {"task": "depth"}
    dst = load_weights(Toy(), path)
    assert torch.equal(dst.head.weight, src.head.weight)
    with pytest.raises(ValueError, match="shapes differ"):
        load_weights(Toy(width=4), path)
    bigger = Toy()
    bigger.head2 = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"missing \['head2.bias', 'head2.weight'\], unexpected \[\]"):
        load_weights(bigger, path)  # a tensor the model has and the file lacks: not left as initialised
    save_weights(bigger, path, {"task": "depth"})
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['head2.bias', 'head2.weight'\]"):
        load_weights(Toy(), path)
    assert read_meta(str(tmp_path / "official.pth")) is None  # not ours: no metadata to read


def test_a_model_built_on_meta_takes_the_weight_files_tensors_in_its_own_dtypes(tmp_path):
    # eval.py / predict.py build on `meta` and take the file's tensors themselves: a float16 copy of a weight
    # file still gives the float32 model the frozen parts (read from the SD file in float32) expect
    from vpd.trained import load_weights, save_weights
    path = str(tmp_path / "w.safetensors")
    src = Toy().half()
    save_weights(src, path, {})
    with torch.device("meta"):
        dst = Toy()
    dst.backbone.vae = torch.nn.Linear(2, 2)  # the frozen part, read from elsewhere
    dst = load_weights(dst, path)
    assert dst.head.weight.dtype == torch.float32 and not dst.head.weight.is_meta
    assert torch.equal(dst.head.weight, src.head.weight.float())


def test_weights_file_leaves_out_the_frozen_vae_and_text_encoder(tmp_path):
    # the VAE and CLIP text encoder come from the SD checkpoint the metadata names: not saved, not asked for
    from vpd.trained import load_weights, save_weights
    path = str(tmp_path / "w.safetensors")
    src = Toy()
    src.clip = torch.nn.Linear(2, 2)
    save_weights(src, path, {"task": "refer"})
    assert sorted(load_file(path)) == ["head.bias", "head.weight"]
    dst = Toy()
    dst.clip = torch.nn.Linear(2, 2)
    assert torch.equal(load_weights(dst, path).head.weight, src.head.weight)


def test_metadata_of_other_safetensors_files_is_none_and_junk_is_named(tmp_path):
    # an official SD file has no (or other) metadata: not ours; a damaged file is a ValueError naming it
    from safetensors.torch import save_file

    from vpd.trained import read_meta
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    assert read_meta(str(tmp_path / "bare.safetensors")) is None
    assert read_meta(str(tmp_path / "other.safetensors")) is None
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable"):
        read_meta(str(tmp_path / "junk.safetensors"))


def test_demo_sd_file_is_seeded_written_once_and_never_left_half_written(tmp_path, monkeypatch):
    import vpd.demo
    a, b = tmp_path / "a.safetensors", tmp_path / "new" / "b.safetensors"
    write_random_sd(str(a), seed=0)
    write_random_sd(str(b), seed=0)  # its folder is made
    first = a.read_bytes()
    assert b.read_bytes() == first  # the same seed gives the same weights
    write_random_sd(str(a), seed=1)  # an existing file is kept: a resumed demo run reads the frozen parts it began with
    assert a.read_bytes() == first
    # writing it leaves the caller's random stream alone: a demo run that writes the file trains as one given it
    torch.manual_seed(3)
    write_random_sd(str(tmp_path / "d.safetensors"), seed=0)
    after_writing = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(after_writing, torch.rand(4))
    assert (tmp_path / "d.safetensors").read_bytes() == first

    def torn(state, path):  # half the file written, then Ctrl-C (or a full disk)
        with open(path, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(vpd.demo, "save_file", torn)
    with pytest.raises(KeyboardInterrupt):
        write_random_sd(str(tmp_path / "c" / "sd.safetensors"))
    assert os.listdir(tmp_path / "c") == []  # no half file that the next call would take as written


def test_default_dataset_and_split_set_are_written_out():
    # so that --resume given them explicitly (--dataset nyu) is the same run as one started without
    for argv, dataset, split_by in ((["--demo"], "nyu", None), (["--demo", "--task", "refer"], "refcoco", "unc"),
                                    (["--demo", "--task", "refer", "--dataset", "refcocog", "--data-root", "r"],
                                     "refcocog", "umd"),
                                    (["--demo", "--task", "semseg"], "ade20k", None)):
        args = train.get_args(argv)
        assert (args.dataset, args.split_by) == (dataset, split_by)


@pytest.mark.parametrize("argv, words", [
    (["--batch-size", "0"], ["--batch-size", ">= 1, got 0"]),
    (["--iters", "0"], ["--iters", ">= 1, got 0"]),  # not the preset's epochs instead
    (["--log-every", "0"], ["--log-every", ">= 1"]),  # (it divides the step count)
    (["--iters", "-3"], ["--iters", ">= 1, got -3"]),
    (["--max-samples", "0"], ["--max-samples", ">= 1"]),  # eval.py
    (["--workers", "x"], ["--workers", "expected an integer, got 'x'"]),
    (["--task", "semseg", "--crop", "100"], ["--crop 100", "multiples of 64"]),
    (["--task", "depth", "--crop", "100"], ["--crop 100", "multiples of 32"]),
    (["--lr", "-1"], ["--lr", "finite number > 0, got -1"]),  # before the model is built
    (["--lr", "0"], ["--lr", "> 0, got 0"]),
    (["--lr", "nan"], ["--lr", "finite number"]),
    (["--weight-decay", "-0.1"], ["--weight-decay", ">= 0, got -0.1"]),
    (["--unet-lr-mult", "-1"], ["--unet-lr-mult", ">= 0, got -1"]),  # it would be gradient ascent
    (["--lr", "1e-4x"], ["--lr", "expected a number, got '1e-4x'"]),
    (["--task", "depth", "--split-by", "unc"], ["--split-by is for the refer task, not depth"]),  # not ignored
    (["--task", "refer", "--split-by", "bogus"], ["--split-by", "invalid choice: 'bogus'"]),  # not "no data"
    (["--task", "semseg", "--dataset", "nyu"], ["--dataset 'nyu' is not a semseg dataset: ade20k"]),
    (["--dataset", "kitti"], ["--demo synthesises nyu data only: --dataset kitti wants --data-root"]),
    (["--task", "refer", "--dataset", "refcocog"], ["--demo synthesises refcoco data only"]),
    (["--seed", "-1"], ["--seed", ">= 0, got -1"]),  # numpy's SeedSequence refuses it, at the first batch
    (["--task", "depth", "--warmup-iters", "100"], ["--warmup-iters", "depth schedule", "no warmup"]),  # not ignored
])
def test_bad_numbers_are_argument_errors(argv, words, capsys):
    script = eval_script if "--max-samples" in argv else train
    with pytest.raises(SystemExit) as e:
        script.get_args(["--demo", *argv])
    assert e.value.code == 2  # argparse's usage error, before anything is built
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)


@pytest.mark.parametrize("argv, words", [
    (["--task", "semseg"], ["real training needs both --sd-ckpt and --data-root", "--demo"]),  # not the demo
    ([], ["--task is required", "--demo"]),
    (["--task", "depth", "--sd-ckpt", "sd.safetensors"], ["real training needs both"]),
])
def test_real_training_wants_its_files_and_the_demo_is_asked_for(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        train.get_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words), err
    assert train.get_args(["--demo"]).task == "depth"


def test_batch_that_does_not_split_stops_before_the_model_is_built(tmp_path):
    args = train.get_args(["--demo", "--out", str(tmp_path), "--batch-size", "3", "--micro-batch", "2"])
    with pytest.raises(SystemExit, match="^--batch-size 3 does not split evenly over 1 process x --micro-batch 2$"):
        train.main(args)  # (no word of the depth recipe's 3 images per process: the demo has not got it)
    assert not os.path.exists(tmp_path / "tiny_sd.safetensors")  # nothing written or built yet


def interrupt_in_step(monkeypatch, n, error=KeyboardInterrupt):
    """Ctrl-C (or `error`) arrives during the n-th step's forward (one micro-batch per step in these runs)."""
    from vpd.tasks import forward_loss
    calls = []

    def forward(*args):
        calls.append(1)
        if len(calls) == n:
            raise error
        return forward_loss(*args)
    monkeypatch.setattr(train, "forward_loss", forward)


def test_sigterm_ends_a_run_as_ctrl_c_does(world, tmp_path):
    # what a cluster scheduler sends at the time limit, to every process of the job (loader workers too):
    # one line naming the checkpoint, no traceback
    import signal
    import time
    out = tmp_path / "terminated"
    p = subprocess.Popen([sys.executable, "train.py", *flags(world, "depth", out, "--iters", 10000, "--batch-size", 2,
                                                             "--save-every", 2, "--workers", 1)],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + 120
    while not (out / "state.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "Traceback" not in err, err[-2000:]
    step = torch.load(out / "state.pt", weights_only=False)["step"]
    assert re.search(rf"terminated in (step|the save after step) \d+; the checkpoint in {re.escape(str(out))} is "
                     rf"at step ({step}|\d+, if the save got that far, else {step})", err), err[-2000:]


def test_a_loader_worker_terminated_first_ends_the_run_as_sigterm_does(world, tmp_path, monkeypatch):
    # the scheduler's SIGTERM reaches a loader worker too; the DataLoader's SIGCHLD handler may report its
    # death before terminate() runs: the same one line, and any other error raised as it is
    interrupt_in_step(monkeypatch, 3, RuntimeError("DataLoader worker (pid 123) is killed by signal: Terminated. "))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_here(flags(world, "depth", out, "--iters", 5, "--batch-size", 2, "--save-every", 1))
    assert e.value.code == f"terminated in step 3; the checkpoint in {out} is at step 2: continue with --resume --out {out}"
    monkeypatch.undo()
    interrupt_in_step(monkeypatch, 3, RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed. "))
    with pytest.raises(RuntimeError, match="Killed"):
        train_here(flags(world, "depth", tmp_path / "other", "--iters", 5, "--batch-size", 2, "--save-every", 1))


def test_ctrl_c_and_unreadable_file_end_in_one_line_naming_the_checkpoint(world, tmp_path, monkeypatch):
    from vpd.trained import save_state
    interrupt_in_step(monkeypatch, 3)
    out = tmp_path / "interrupted"
    with pytest.raises(SystemExit) as e:
        train_here(flags(world, "depth", out, "--iters", 5, "--batch-size", 2, "--save-every", 1))
    assert e.value.code == (f"interrupted in step 3; the checkpoint in {out} is at step 2: "
                            f"continue with --resume --out {out}")
    assert torch.load(out / "state.pt", weights_only=False)["step"] == 2
    monkeypatch.undo()

    def interrupt_save(*args, **kwargs):  # Ctrl-C while the step-2 checkpoint is written
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "save_state", lambda obj, path: (interrupt_save() if obj["step"] == 2 else
                                                               save_state(obj, path)))
    with pytest.raises(SystemExit) as e:
        train_here(flags(world, "depth", tmp_path / "in_save", "--iters", 3, "--batch-size", 2, "--save-every", 1))
    assert e.value.code == (f"interrupted in the save after step 2; the checkpoint in {tmp_path / 'in_save'} is at "
                            f"step 2, if the save got that far, else 1: continue with --resume --out {tmp_path / 'in_save'}")
    monkeypatch.undo()

    def interrupt(*args, **kwargs):  # Ctrl-C during the last evaluation
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "evaluate", interrupt)
    with pytest.raises(SystemExit) as e:
        train_here(flags(world, "depth", tmp_path / "in_eval", "--iters", 1, "--batch-size", 2))
    assert e.value.code == (f"interrupted in the evaluation after step 1; the checkpoint in {tmp_path / 'in_eval'} "
                            f"is at step 1: continue with --resume --out {tmp_path / 'in_eval'}")
    monkeypatch.undo()

    import shutil
    root = tmp_path / "data"
    shutil.copytree(world["roots"]["depth"], root)
    bad = sorted(glob.glob(str(root / "sync" / "*" / "rgb_*.jpg")))
    for path in bad:  # every training image truncated: the first batch meets one
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 3])
    argv = flags(world, "depth", tmp_path / "bad_file", "--iters", 2, "--batch-size", 2)
    argv[argv.index("--data-root") + 1] = str(root)
    for workers in ("0", "1"):  # a loader worker's error comes back with its traceback as the message
        argv[argv.index("--workers") + 1] = workers
        with pytest.raises(SystemExit) as e:
            train_here(argv)
        msg = e.value.code
        assert "\n" not in msg and msg.startswith(f"cannot read image {root}") and ".jpg" in msg, msg
        assert msg.endswith("in step 1; no checkpoint was written yet (a new run may take this --out)"), msg

    for path in glob.glob(str(root / "official_splits" / "test" / "*" / "rgb_*.jpg")):
        open(path, "wb").write(b"not a jpeg")
    ckpt = loss_run(world, "depth") / "model.safetensors"
    with pytest.raises(SystemExit) as e:  # eval.py: the same one line, through its 2 loader workers
        eval_script.main(eval_script.get_args(["--ckpt", str(ckpt), "--data-root", str(root), "--out",
                                               str(tmp_path / "ev")]))
    assert "\n" not in e.value.code and e.value.code.startswith(f"cannot read image {root}"), e.value.code


def test_resume_keeps_the_runs_settings_and_survives_a_crash_in_save_or_final_eval(world, tmp_path, monkeypatch):
    ref = loss_run(world, "semseg")  # a finished 16-step run
    args = flags(world, "semseg", ref, *LOSS_RUN, crop=LOSS_CROP["semseg"])
    # a fresh run into a folder with a checkpoint would overwrite it (and append to its log)
    with pytest.raises(SystemExit, match="holds the checkpoint of an earlier run: continue it with --resume"):
        train_here(args)
    # a changed schedule or batch on --resume was silently taken (the demo's default --iters 300 too)
    changed = list(args)
    changed[changed.index("--iters") + 1] = "20"
    with pytest.raises(SystemExit, match=r"started with --iters 16 \(not 20\); pass the same values"):
        train_here(changed + ["--resume"])
    with pytest.raises(SystemExit, match=r"started with --micro-batch 4 \(not 2\)"):
        train_here(args + ["--resume", "--micro-batch", "2"])
    # its micro-batch was the batch / processes: the batch names the change (the same batch mends both)
    with pytest.raises(SystemExit, match=r"started with --batch-size 4 \(not 8\); pass the same values"):
        train_here(args + ["--resume", "--batch-size", "8"])
    # a setting with no flag, changed in train.py's presets since the run started: no flag to suggest
    with monkeypatch.context() as m:
        m.setitem(train.PRESETS["semseg"], "min_lr_ratio", 0.5)
        with pytest.raises(SystemExit, match=r"started with min_lr_ratio 0.0 \(this train.py's preset: 0.5\); pass the "
                           "same values; a preset differs: resume with the train.py the run started with$"):
            train_here(args + ["--resume"])

    import shutil
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vpd.trained import read_meta
    out = tmp_path / "crashed"
    shutil.copytree(ref, out)
    args[args.index("--out") + 1] = str(out)
    # killed between the two writes of the last save (state.pt is written first), and before the
    # last evaluation finished: resume writes the weights file again and evaluates
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["vpd"])
        stale = {k: torch.zeros_like(f.get_tensor(k)) for k in f.keys()}
    save_file(stale, str(out / "model.safetensors"), metadata={"vpd": json.dumps(dict(meta, step=14))})
    os.remove(out / "metrics.json")
    train_here(args + ["--resume"])
    assert json.load(open(out / "metrics.json")) == json.load(open(ref / "metrics.json"))
    for k, v in params(out).items():
        assert torch.equal(v, params(ref)[k]), k
    assert [r["step"] for r in records(out) if "loss" not in r] == [STEPS]  # the new evaluation's line alone
    os.remove(out / "model.safetensors")  # killed before the first weights file was in place
    train_here(args + ["--resume"])
    assert read_meta(str(out / "model.safetensors"))["step"] == STEPS
    old = torch.load(out / "state.pt", weights_only=False)
    torch.save(dict(old, ranks=old["ranks"] * 2), out / "state.pt")  # written by a 2-process run
    with pytest.raises(SystemExit, match=r"was written by 2 processes, this run has 1: launch it with 2 \(torchrun"):
        train_here(args + ["--resume"])
    torch.save(old, out / "state.pt")
    train_here([a for a in args if a != "--demo"] + ["--resume"])  # left out, --demo is the run's own
    # a state.pt holding None for the default dataset and split set is the same run as one naming them,
    # and one written before --param-groups existed trained with the default groups
    started = {k: v for k, v in old["args"].items() if k != "param_groups"}
    torch.save(dict(old, args=dict(started, dataset=None, split_by=None)), out / "state.pt")
    train_here(args + ["--resume", "--dataset", "ade20k"])  # (finished and evaluated: nothing to do)
    with pytest.raises(SystemExit, match="started with --param-groups default"):
        train_here(args + ["--resume", "--param-groups", "official"])
    (out / "state.pt").write_bytes(b"truncated")
    with pytest.raises(SystemExit, match="--resume: cannot read the checkpoint in"):
        train_here(args + ["--resume"])


def test_out_of_memory_and_eval_errors_say_what_to_change_and_which_checkpoint_is_left(world, tmp_path, monkeypatch):
    from vpd.tasks import forward_loss
    calls = []

    def oom_at_third(*a):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward_loss(*a)
    monkeypatch.setattr(train, "forward_loss", oom_at_third)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"^out of memory with 2 images per forward \(try a --micro-batch under 2 "
                       r"\(accumulated to the same --batch-size\) or --grad-checkpoint\) in step 3; the checkpoint "
                       f"in {out} is at step 2: continue with --resume --out {out}$"):
        train_here(flags(world, "depth", out, "--iters", 4, "--batch-size", 2, "--save-every", 1))
    calls.clear()  # one image per forward and checkpointing already on: nothing to suggest
    with pytest.raises(SystemExit, match=r"^out of memory with 1 image per forward in step 3; the checkpoint"):
        train_here(flags(world, "depth", tmp_path / "small", "--iters", 4, "--batch-size", 1, "--save-every", 1,
                         "--grad-checkpoint"))

    def oom_in_eval(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(train, "evaluate", oom_in_eval)  # the evaluation forwards its own way: no advice on it
    with pytest.raises(SystemExit, match=r"^out of memory in the evaluation after step 2; the checkpoint in .* is "
                       "at step 2"):
        train_here(flags(world, "depth", tmp_path / "eval", "--iters", 2, "--batch-size", 2))

    def unreadable_in_eval(*a, **kw):
        raise ValueError("cannot read image x.jpg")
    monkeypatch.setattr(train, "evaluate", unreadable_in_eval)  # an evaluation between checkpoints, before the first
    with pytest.raises(SystemExit, match=r"^evaluation after step 1: cannot read image x.jpg \(no checkpoint was "
                       r"written yet\)$"):
        train_here(flags(world, "depth", tmp_path / "early", "--iters", 4, "--batch-size", 2, "--eval-every", 1,
                         "--save-every", 4))


@pytest.mark.parametrize("poison", ["nan loss", "inf statistics"])
def test_a_diverged_run_keeps_its_last_good_checkpoint(world, tmp_path, monkeypatch, poison):
    from vpd.tasks import forward_loss
    calls = []

    def bad_from_third(model, loss_fn, task, batch):  # from the third step: NaN gradients, then weights; or an
        calls.append(1)                               # overflowed BatchNorm variance (infinite, not NaN)
        if len(calls) >= 3 and poison == "inf statistics":  # (training-mode BN keeps it infinite)
            next(b for n, b in model.named_buffers() if n.endswith("running_var")).fill_(float("inf"))
        loss = forward_loss(model, loss_fn, task, batch)
        return loss * float("nan") if len(calls) >= 3 and poison == "nan loss" else loss
    monkeypatch.setattr(train, "forward_loss", bad_from_third)
    out = tmp_path / "diverged"
    with pytest.raises(SystemExit, match=f"non-finite weights after step 3 .*checkpoint in {out} stays at step 2"):
        train_here(flags(world, "depth", out, "--iters", 6, "--batch-size", 2, "--save-every", 1, "--log-every", 6))
    assert torch.load(out / "state.pt", weights_only=False)["step"] == 2
    weights = load_file(str(out / "model.safetensors"))
    assert all(v.isfinite().all() for v in weights.values() if v.is_floating_point())
    assert not list(out.glob("*.tmp*"))


def test_a_run_diverged_before_its_first_checkpoint_says_there_is_none(world, tmp_path, monkeypatch):
    from vpd.tasks import forward_loss
    monkeypatch.setattr(train, "forward_loss", lambda *a: forward_loss(*a) * float("nan"))
    out = tmp_path / "diverged"
    with pytest.raises(SystemExit, match=r"non-finite weights after step 1 .*: not saved; no checkpoint was "
                                         r"written \("):
        train_here(flags(world, "depth", out, "--iters", 4, "--batch-size", 2, "--save-every", 1, "--log-every", 4))
    assert not (out / "state.pt").exists()


def test_resume_takes_moved_files_of_the_same_contents_and_refuses_others(world, tmp_path, capsys):
    import shutil
    sd, root = tmp_path / "moved" / "sd.safetensors", tmp_path / "moved" / "data"
    shutil.copytree(world["roots"]["depth"], root)
    shutil.copyfile(world["sd"], sd)
    args = flags(world, "depth", tmp_path / "run", "--iters", 3, "--batch-size", 2)
    train_here(args + ["--stop-after", "1"])
    moved = list(args)
    moved[moved.index("--sd-ckpt") + 1], moved[moved.index("--data-root") + 1] = str(sd), str(root)
    other = write_random_sd(str(tmp_path / "other.safetensors"), seed=1)  # same shapes, other weights
    with pytest.raises(SystemExit, match=r"--sd-ckpt .*other.safetensors is not the SD file the run in .* started "
                                         r"with \(.*sd.safetensors\): its frozen VAE/CLIP weights differ"):
        train_here([other if a == str(sd) else a for a in moved] + ["--resume", "--stop-after", "2"])
    with pytest.raises(SystemExit, match=r"directory not found: .*data_semseg.sync"):  # no NYUv2 there
        train_here([world["roots"]["semseg"] if a == str(root) else a for a in moved] + ["--resume"])
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    torch.save({k: v for k, v in state.items() if k != "frozen_sha256"}, tmp_path / "run" / "state.pt")
    with pytest.raises(SystemExit, match=r"started with --sd-ckpt .*train.*sd.safetensors \(not .*moved"):
        train_here(moved + ["--resume"])  # a state from before fingerprints: by path alone
    torch.save(state, tmp_path / "run" / "state.pt")
    capsys.readouterr()
    train_here(moved + ["--resume", "--stop-after", "2"])
    said = capsys.readouterr().out
    assert f"--sd-ckpt {sd} in place of {world['sd']}, which the run started with (the same frozen weights)" in said
    assert f"--data-root {root} in place of {world['roots']['depth']}" in said
    # recorded: the next resume compares with the new paths, and eval.py finds the SD file there
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=False)["args"]["sd_ckpt"] == str(sd)
    shutil.copyfile(sd, tmp_path / "kept.safetensors")
    shutil.copyfile(other, sd)  # other weights in the run's own SD file: refused all the same
    with pytest.raises(SystemExit, match=r"--sd-ckpt .*moved.sd.safetensors is not the SD file the run in .* "
                                         r"started with \(.*moved.sd.safetensors\): its frozen VAE/CLIP weights differ"):
        train_here(moved + ["--resume"])
    shutil.copyfile(tmp_path / "kept.safetensors", sd)
    train_here(moved + ["--resume"])
    assert "in place of" not in capsys.readouterr().out
    from vpd.trained import read_meta
    assert read_meta(str(tmp_path / "run" / "model.safetensors"))["sd_ckpt"] == str(sd)


def test_resume_without_amp_keeps_the_runs_precision(world, tmp_path):
    # a GPU run (bf16 by default) resumed on a CPU, where the default is off: the run's own, not refused
    args = flags(world, "depth", tmp_path / "run", "--iters", 2, "--batch-size", 2)
    train_here(args + ["--amp", "bf16", "--stop-after", "1"])
    train_here(args + ["--resume"])
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert (state["step"], state["args"]["amp"]) == (2, "bf16")


def test_resume_refuses_a_training_set_of_another_size(world, tmp_path):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(world["roots"]["depth"], root)
    args = flags(world, "depth", tmp_path / "run", "--iters", 4, "--batch-size", 2)
    args[args.index("--data-root") + 1] = str(root)
    train_here(args + ["--stop-after", "1"])
    lines = (root / "train_list.txt").read_text().splitlines(keepends=True)
    (root / "train_list.txt").write_text("".join(lines[:-2]))  # same folder, two samples fewer
    with pytest.raises(SystemExit, match=f"trained on {len(lines)} samples; --data-root {root} now holds "
                                         f"{len(lines) - 2}"):
        train_here(args + ["--resume"])


def test_a_run_killed_in_an_intermediate_evaluation_evaluates_again_on_resume(world, tmp_path, monkeypatch):
    real, workers = train.evaluate, []

    def interrupt_the_second(*args, **kwargs):  # Ctrl-C in the evaluation after step 4 (its checkpoint is
        workers.append(kwargs["workers"])      # saved), while metrics.json holds step 2's
        if len(workers) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "evaluate", interrupt_the_second)
    out = tmp_path / "run"
    args = flags(world, "depth", out, "--iters", 6, "--batch-size", 2, "--save-every", 2, "--eval-every", 2)
    with pytest.raises(SystemExit, match="interrupted in the evaluation after step 4"):
        train_here(args)
    assert json.load(open(out / "metrics.json"))["step"] == 2
    train_here(args + ["--resume"])
    assert [r["step"] for r in records(out) if "loss" not in r] == [2, 4, 6]  # each evaluation once
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert workers == [0] * 5  # --workers 0 reaches every evaluation: steps 2, 4 (cut), 4, 6, the demo's baseline


def fake_clock(monkeypatch):
    """train.py's clock replaced by one that stands still; returns tick(seconds, fn): fn, moving it on
    by `seconds` at each call. Training steps tick 1 s each (one micro-batch per step in these runs)."""
    from types import SimpleNamespace

    from vpd.tasks import forward_loss
    clock = [0.0]

    def tick(seconds, fn):
        def wrapped(*a, **kw):
            clock[0] += seconds
            return fn(*a, **kw)
        return wrapped
    monkeypatch.setattr(train, "time", SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(train, "forward_loss", tick(1, forward_loss))
    return tick


def test_logged_speed_counts_the_training_steps_alone(world, tmp_path, monkeypatch):
    # 1 s per step, 100 s per evaluation and 50 s per save: ms is 1000 in every log line, the first
    # one after a resume included (its window starts at the resumed step)
    tick = fake_clock(monkeypatch)
    monkeypatch.setattr(train, "evaluate", tick(100, train.evaluate))
    monkeypatch.setattr(train, "save_state", tick(50, train.save_state))
    args = flags(world, "depth", tmp_path / "run", "--iters", 4, "--batch-size", 2, "--log-every", 3, "--save-every", 1,
                 "--eval-every", 1)
    train_here(args + ["--stop-after", "2"])
    train_here(args + ["--resume"])
    assert [(r["step"], r["ms"], r["img_s"]) for r in records(tmp_path / "run") if "loss" in r] == [(3, 1000, 2),
                                                                                                     (4, 1000, 2)]
    args = flags(world, "depth", tmp_path / "pairs", "--iters", 4, "--batch-size", 2, "--log-every", 2,
                 "--save-every", 1, "--eval-every", 1)  # windows of two steps, a save and an evaluation after each
    train_here(args)
    assert [(r["step"], r["ms"]) for r in records(tmp_path / "pairs") if "loss" in r] == [(2, 1000), (4, 1000)]
    # accumulated: two forwards of 2 images make a step of 4, so 2 s and 4 images per step
    args = flags(world, "depth", tmp_path / "accum", "--iters", 2, "--batch-size", 4, "--micro-batch", 2,
                 "--log-every", 2)
    train_here(args)
    assert [(r["step"], r["ms"], r["img_s"]) for r in records(tmp_path / "accum") if "loss" in r] == [(2, 2000, 2)]


def test_an_evaluation_redone_on_resume_is_not_counted_in_the_speed(world, tmp_path, monkeypatch):
    tick = fake_clock(monkeypatch)
    real_eval = train.evaluate

    def interrupt(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "evaluate", interrupt)
    args = flags(world, "depth", tmp_path / "run", "--iters", 4, "--batch-size", 2, "--log-every", 4,
                 "--save-every", 2, "--eval-every", 2)
    with pytest.raises(SystemExit, match="in the evaluation after step 2"):
        train_here(args)
    monkeypatch.setattr(train, "evaluate", tick(100, real_eval))
    train_here(args + ["--resume"])  # evaluates step 2 again, then trains steps 3-4
    assert [(r["step"], r["ms"]) for r in records(tmp_path / "run") if "loss" in r] == [(4, 1000)]


@pytest.mark.parametrize("flag, value", [("--lr", "1e-3"), ("--seed", "1"), ("--crop", "128"),
                                         ("--weight-decay", "0.5"), ("--unet-lr-mult", "0.1"),
                                         ("--warmup-iters", "3"), ("--amp", "bf16"), ("--batch-size", "8"),
                                         ("--param-groups", "official")])
def test_resume_refuses_each_changed_run_setting(world, flag, value):
    ref = loss_run(world, "semseg")
    args = flags(world, "semseg", ref, *LOSS_RUN, crop=LOSS_CROP["semseg"])
    args = args[:args.index(flag)] + args[args.index(flag) + 2:] if flag in args else args
    with pytest.raises(SystemExit, match=f"started with {flag} .*; pass the same values"):
        train_here(args + [flag, value, "--resume"])


def test_resume_refuses_another_length_in_epochs_or_another_dataset(world, tmp_path):
    # a depth run's length in epochs sets its step count and the peak of its rise-and-fall schedule
    args = flags(world, "depth", tmp_path / "run", "--epochs", 2, "--batch-size", 2)
    train_here(args + ["--stop-after", "1"])
    with pytest.raises(SystemExit, match=r"started with --epochs 2 \(not 3\); pass the same values"):
        train_here(args[:args.index("--epochs")] + args[args.index("--epochs") + 2:] + ["--epochs", "3", "--resume"])
    with pytest.raises(SystemExit, match=r"started with --dataset nyu \(not kitti\)"):
        train_here(args + ["--dataset", "kitti", "--resume"])
    with pytest.raises(SystemExit, match=r"started with --iters unset \(not 6\); pass the same values"):
        train_here(["--resume", "--out", str(tmp_path / "run"), "--iters", "6"])  # its length was in epochs


def test_param_groups_official_reaches_the_optimizer(world, tmp_path, monkeypatch):
    seen, real = [], train.build_optimizer
    monkeypatch.setattr(train, "build_optimizer", lambda *a, **kw: seen.append(kw["official"]) or real(*a, **kw))
    train_here(flags(world, "semseg", tmp_path / "run", "--iters", 1, "--batch-size", 2, "--eval-max", 1,
                     "--param-groups", "official"))
    assert seen == ["semseg"]
    with pytest.raises(SystemExit):  # VPD's depth groups are the default ones: the flag would only block --resume
        train.get_args(flags(world, "depth", tmp_path / "depth", "--param-groups", "official"))


def test_unet_lr_multiplier_and_weight_decay_reach_the_optimizer(world, tmp_path, monkeypatch):
    made, real = [], train.build_optimizer
    monkeypatch.setattr(train, "build_optimizer", lambda *a, **kw: made.append((a[0], real(*a, **kw))) or made[-1][1])
    train_here(flags(world, "semseg", tmp_path / "run", "--iters", 1, "--batch-size", 2, "--eval-max", 1,
                     "--lr", "2e-3", "--unet-lr-mult", "0.1", "--weight-decay", "1e-3"))
    (model, optimizer), = made
    group = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(group) == len(trained)  # every trained tensor in one group, the frozen ones in none
    for name, p in trained:  # VPD's depth code's groups: the UNet at lr x mult, no decay on 1-d tensors
        g = group[id(p)]
        assert g["lr_scale"] == (0.1 if name.startswith("backbone.unet.") else 1.0), name
        assert g["weight_decay"] == (0.0 if p.ndim == 1 else 1e-3), name
    assert {round(g["lr"] / g["lr_scale"], 12) for g in optimizer.param_groups} == {2e-3}  # step 1: poly at --lr


def test_presets_are_the_papers_recipes():
    # VPD's configs and scripts: semseg AdamW 8e-5, wd 1e-3, UNet x0.1, 80k iters of 16, 512 crops, poly 1, 1500
    # warmup iters; depth AdamW 5e-4, wd 0.1, UNet x0.01, 25 epochs of 24, 480 crops, 3e-5 -> 5e-4 -> 3e-5
    # (power 0.9); refer AdamW 5e-5, wd 1e-2, UNet x1 (torch ignored lr_scale), 40 epochs of 32, 512, poly 0.9
    real = ["--sd-ckpt", "sd.safetensors", "--data-root", "data"]
    s, d, r = (train.get_args(["--task", t, *real]) for t in ("semseg", "depth", "refer"))
    assert (s.lr, s.weight_decay, s.unet_lr_mult, s.iters, s.batch_size, s.crop, s.schedule, s.power,
            s.warmup_iters) == (8e-5, 1e-3, 0.1, 80_000, 16, 512, "poly", 1.0, 1500)
    assert (d.lr, d.weight_decay, d.unet_lr_mult, d.iters, d.epochs, d.batch_size, d.crop, d.schedule, d.power,
            d.warmup_iters) == (5e-4, 0.1, 0.01, None, 25, 24, 480, "updown", 0.9, 0)
    assert d.lr * d.min_lr_ratio == pytest.approx(3e-5)
    assert (r.lr, r.weight_decay, r.unet_lr_mult, r.iters, r.epochs, r.batch_size, r.crop, r.schedule, r.power,
            r.warmup_iters) == (5e-5, 1e-2, 1.0, None, 40, 32, 512, "poly", 0.9, 0)
    assert s.min_lr_ratio == r.min_lr_ratio == 0.0  # mmseg's and LAVT's poly decay to zero
    assert (s.log_every, s.save_every) == (50, 1000)  # the defaults the help texts name


def test_each_epoch_reshuffles_and_reaugments(world, tmp_path, monkeypatch):
    # 12 training images, batch 4: 3 steps per epoch, 3 epochs. Each epoch takes every image once, in a
    # new order (the permutation of (seed, epoch)), with the dataset told its epoch before it loads
    from vpd.data import NYUv2
    seen, epochs, set_epoch = [], [], NYUv2.set_epoch

    def recording(model, raw, task, batch):
        seen.append(batch["index"].tolist())
        return forward_loss(model, raw, task, batch)

    def record_epoch(self, epoch):
        epochs.append(epoch)
        set_epoch(self, epoch)
    forward_loss = train.forward_loss
    monkeypatch.setattr(train, "forward_loss", recording)
    monkeypatch.setattr(NYUv2, "set_epoch", record_epoch)
    train_here(flags(world, "depth", tmp_path / "run", "--epochs", 3, "--batch-size", 4, "--eval-max", 1))
    assert epochs == [0, 1, 2, 0] and len(seen) == 9  # (the last 0: the demo baseline, fitted to epoch 0)
    orders = [sum(seen[3 * e:3 * e + 3], []) for e in range(3)]
    assert all(sorted(o) == list(range(12)) for o in orders)
    assert orders[0] != orders[1] and orders[1] != orders[2]


def test_logged_loss_is_the_windows_mean_and_lr_peaks_at_half_the_epochs(world, tmp_path):
    # 3 epochs of 3 steps: VPD's depth lr rises to --lr at the end of epoch epochs // 2 = 1 (step 3,
    # the lr of step s being set before it), then falls; a log line holds the mean loss of its steps
    common = ["--epochs", 3, "--batch-size", 4, "--eval-max", 1, "--lr", 1e-3]
    train_here(flags(world, "depth", tmp_path / "every", *common))
    train_here(flags(world, "depth", tmp_path / "pairs", *common, "--log-every", 2))
    every, pairs = losses(tmp_path / "every"), losses(tmp_path / "pairs")
    assert [s for s, _, _ in every] == list(range(1, 10)) and [s for s, _, _ in pairs] == [2, 4, 6, 8, 9]
    lrs = [lr for _, _, lr in every]
    assert lrs.index(max(lrs)) == 2 and max(lrs) == pytest.approx(1e-3, rel=1e-12)
    assert lrs[:3] == sorted(lrs[:3]) and lrs[2:] == sorted(lrs[2:], reverse=True)
    # by hand (VPD's depth script): 3e-5 -> 5e-4 -> 3e-5 in --lr's units is 0.06 -> 1 -> 0.06, power 0.9, steps
    # counted from 1 against the peak at step 3; the fall reaches the floor at step 6
    rise = [0.06 + 0.94 * (s / 3) ** 0.9 for s in (1, 2)]
    fall = [1.0, 1 - 0.94 * (1 / 3) ** 0.9, 1 - 0.94 * (2 / 3) ** 0.9, 0.06, 0.06, 0.06, 0.06]
    assert lrs == pytest.approx([1e-3 * f for f in rise + fall], rel=1e-9)
    loss = {s: l for s, l, _ in every}
    for s, l, _ in pairs:
        want = loss[s] if s == 9 else (loss[s - 1] + loss[s]) / 2  # step 9: a window of one step
        assert l == pytest.approx(want, rel=1e-5), s
    # a length in --iters (4 steps, the preset's 25 epochs overridden): the peak at step 4 // 2 = 2
    train_here(flags(world, "depth", tmp_path / "iters", "--iters", 4, "--batch-size", 4, "--eval-max", 1,
                     "--lr", 1e-3))
    by_hand = [0.06 + 0.94 * (1 / 2) ** 0.9, 1.0, 1 - 0.94 * (1 / 2) ** 0.9, 0.06]
    assert [lr for _, _, lr in losses(tmp_path / "iters")] == pytest.approx([1e-3 * f for f in by_hand], rel=1e-9)


def test_epochs_alone_set_the_length_and_a_fresh_run_clears_an_unsaved_runs_log(world, tmp_path, capsys):
    a = train.get_args(["--task", "semseg", "--sd-ckpt", "x", "--data-root", "y", "--epochs", "3"])
    assert a.iters is None and a.epochs == 3  # not the preset's 80,000 iterations
    assert train.get_args(["--demo", "--epochs", "2"]).iters is None
    b = train.get_args(["--task", "semseg", "--sd-ckpt", "x", "--data-root", "y", "--epochs", "3", "--iters", "7"])
    assert b.iters == 7  # --iters overrides --epochs, as its help says
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps(dict(step=23, loss=1.0, lr=0.0)) + "\n")  # killed before a save
    train_here(flags(world, "depth", out, "--iters", 2, "--batch-size", 2, "--eval-max", 1))
    assert [r["step"] for r in records(out)] == [1, 2, 2]  # two loss lines and the evaluation
    assert f"removed log.jsonl from {out}: left by a run that ended before its first checkpoint" in (
        capsys.readouterr().out)
    os.remove(out / "state.pt")  # finished, its optimizer state deleted to save space: the weights stay
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="holds the trained weights of an earlier run"):
        train_here(flags(world, "depth", out, "--iters", 1, "--batch-size", 2))
    assert (out / "model.safetensors").read_bytes() == before and (out / "metrics.json").is_file()


def test_dataset_names_are_checked(world):
    from vpd.tasks import datasets
    root = world["roots"]["depth"]
    with pytest.raises(SystemExit, match="--dataset 'nuy' is not a depth dataset: nyu, kitti"):
        datasets("depth", root, 32, dataset="nuy")  # not NYUv2 without a word
    with pytest.raises(SystemExit, match="--dataset 'refcoco' is not a semseg dataset"):
        datasets("semseg", world["roots"]["semseg"], 64, dataset="refcoco")  # not ignored
    with pytest.raises(SystemExit, match="does not hold the depth data"):
        datasets("depth", root, 32, dataset="kitti")  # an NYUv2 root is no KITTI root
    train_set, _ = datasets("depth", root, 32, dataset="nyu")
    assert "scene_id" in train_set[0]


def test_semseg_training_evaluates_with_windows_of_its_crop(world, tmp_path, monkeypatch):
    # the evaluation during training slides windows of the training crop (64 here), as eval.py does
    calls, evaluate = [], train.evaluate

    def recording(model, *args, **kwargs):
        calls.append(kwargs)
        return evaluate(model, *args, **kwargs)
    monkeypatch.setattr(train, "evaluate", recording)
    train_here(flags(world, "semseg", tmp_path / "run", "--iters", 1, "--batch-size", 2, "--eval-max", 1))
    assert calls[0]["seg_crop"] == 64


def test_refcocog_takes_77_tokens_and_the_umd_split(monkeypatch):
    # VPD's refer code: sentences of 40 tokens, 77 for G-Ref (UMD split); RefCOCO / RefCOCO+ on the UNC split
    import vpd.data
    from vpd.tasks import datasets, model_kwargs
    seen = []
    monkeypatch.setattr(vpd.data, "RefCOCO", lambda root, **kw: seen.append((kw["dataset"], kw["split_by"],
                                                                              kw["max_tokens"])))
    for name in ("refcocog", "refcoco", "refcoco+"):
        datasets("refer", "root", 64, dataset=name)
    assert seen == [(d, s, n) for d, s, n in [("refcocog", "umd", 77), ("refcoco", "unc", 40),
                                               ("refcoco+", "unc", 40)] for _ in ("train", "eval")]
    assert [model_kwargs("refer", None, False, d)["max_tokens"] for d in ("refcocog", "refcoco")] == [77, 40]


def test_forward_loss_scores_each_task_against_its_own_target():
    # a model that predicts each batch's target exactly has a near-zero loss: the refer mask's 1s are
    # the target class, the semseg label is the class map, the depth model is asked for each image's scene
    from vpd.model import VPDDepth, VPDRefer, VPDSeg
    from vpd.tasks import forward_loss
    image = torch.zeros(2, 3, 4, 4)
    mask = torch.zeros(2, 4, 4, dtype=torch.uint8)
    mask[:, :2] = 1
    refer = lambda x, tokens: torch.stack([1 - mask, mask], 1).float() * 40 - 20  # +-20 on the right class
    assert forward_loss(refer, VPDRefer.loss, "refer", {"image": image, "tokens": None, "mask": mask}) < 1e-6
    label = torch.randint(0, 3, (2, 4, 4))
    seg = lambda x: torch.nn.functional.one_hot(label, 3).permute(0, 3, 1, 2).float() * 40
    assert forward_loss(seg, VPDSeg.loss, "semseg", {"image": image, "label": label}) < 1e-6
    gt = torch.rand(2, 1, 4, 4) + 0.5
    depth = lambda x, ids: gt * ids.view(-1, 1, 1, 1) / torch.tensor([3.0, 5.0]).view(-1, 1, 1, 1)
    assert forward_loss(depth, VPDDepth.loss, "depth", {"image": image, "scene_id": torch.tensor([3, 5]), "depth": gt}) < 1e-3


def test_refer_eval_set_is_the_models_dataset_on_val_unless_a_split_is_given(monkeypatch):
    # the paper's headline numbers are on val; a G-Ref model is evaluated on G-Ref's UMD split by default
    import vpd.data
    import vpd.tasks
    seen = []
    monkeypatch.setattr(vpd.data, "RefCOCO", lambda root, **kw: seen.append(kw) or kw)
    meta = dict(task="refer", demo=False, dataset="refcocog", sd_ckpt=None)
    monkeypatch.setattr(vpd.tasks, "load_model", lambda *a: (torch.nn.Identity(), meta))
    for flags, split in (([], "val"), (["--split", "test"], "test")):
        ev = vpd.tasks.build_eval(eval_script.get_args(["--ckpt", "vpd_refer.pth", "--data-root", "root", *flags]),
                                  torch.device("cpu"))
        assert (ev.dataset_name, ev.split_by, ev.split) == ("refcocog", "umd", split)
        assert (seen[-1]["dataset"], seen[-1]["split_by"], seen[-1]["split"]) == ("refcocog", "umd", split)
    assert seen[-1]["max_tokens"] == 77  # RefCOCOg's long sentences
    # a RefCOCO model (40 tokens) scored on RefCOCOg reads its sentences at the model's length
    model = torch.nn.Identity()
    model.max_tokens = 40
    monkeypatch.setattr(vpd.tasks, "load_model", lambda *a: (model, dict(meta, dataset="refcoco")))
    vpd.tasks.build_eval(eval_script.get_args(["--ckpt", "m.pth", "--data-root", "root", "--dataset", "refcocog"]),
                         torch.device("cpu"))
    assert (seen[-1]["dataset"], seen[-1]["max_tokens"]) == ("refcocog", 40)
    # a model trained on RefCOCOg's google split set is scored on it unless --split-by says otherwise
    google = dict(meta, args={"split_by": "google", "crop": 512})
    monkeypatch.setattr(vpd.tasks, "load_model", lambda *a: (torch.nn.Identity(), google))
    for flags, split_by in (([], "google"), (["--split-by", "umd"], "umd")):
        ev = vpd.tasks.build_eval(eval_script.get_args(["--ckpt", "m.safetensors", "--data-root", "root", *flags]),
                                  torch.device("cpu"))
        assert ev.split_by == seen[-1]["split_by"] == split_by
    assert not any(kw["split"] == "train" for kw in seen)  # evaluation builds no training set


def test_depth_models_are_evaluated_on_the_dataset_they_trained_on(monkeypatch):
    # a KITTI model (80 m, one "street" condition) on NYUv2 or an NYUv2 model on KITTI: refused, not scored
    import vpd.tasks
    for trained, asked in (("kitti", "nyu"), (None, "kitti")):
        meta = dict(task="depth", demo=False, dataset=trained)
        monkeypatch.setattr(vpd.tasks, "load_model", lambda *a, meta=meta: (torch.nn.Identity(), meta))
        args = eval_script.get_args(["--ckpt", "m.safetensors", "--data-root", "root", "--dataset", asked])
        with pytest.raises(SystemExit, match=f"--dataset {asked}: m.safetensors is a {trained or 'nyu'} depth model"):
            vpd.tasks.build_eval(args, torch.device("cpu"))


def test_eval_needs_only_the_split_it_scores(world, tmp_path, monkeypatch):
    # someone with only NYUv2's test set, or ADE20K's validation set, can evaluate (a released model)
    import shutil

    import vpd.tasks
    nyu, ade = tmp_path / "nyu", tmp_path / "ade"
    shutil.copytree(world["roots"]["depth"], nyu)
    shutil.rmtree(nyu / "sync")
    os.remove(nyu / "train_list.txt")
    shutil.copytree(world["roots"]["semseg"], ade)
    for kind in ("images", "annotations"):
        shutil.rmtree(ade / "ADEChallengeData2016" / kind / "training")
    for task, root in (("depth", nyu), ("semseg", ade)):
        meta = dict(task=task, demo=False, dataset=None, depth_crop=None, official=True, sd_ckpt=None)
        monkeypatch.setattr(vpd.tasks, "load_model", lambda *a, meta=meta: (torch.nn.Identity(), meta))
        ev = vpd.tasks.build_eval(eval_script.get_args(["--ckpt", "m.pth", "--data-root", str(root)]),
                                  torch.device("cpu"))
        assert len(ev.dataset) > 0 and ev.split == {"depth": "test", "semseg": "validation"}[task]


def test_datasets_load_in_forkserver_workers(world):
    # Python 3.14's default start method on Linux, forkserver, pickles the dataset to each loader worker
    # (fork, the default before it, shares it): every task's training and evaluation sets must travel so
    from vpd.tasks import datasets
    for task, crop in (("depth", 32), ("semseg", 64), ("refer", 64)):
        for ds in datasets(task, world["roots"][task], crop, max_tokens=8 if task == "refer" else None):
            loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, multiprocessing_context="forkserver")
            batch = next(iter(loader))
            assert batch["image"].shape[1] == 3, task


def test_training_sets_take_the_runs_seed(world):
    # the augmentation (and refer's sentence draw) of every task is seeded by --seed
    from vpd.tasks import datasets
    for task, crop in (("depth", 32), ("semseg", 64), ("refer", 64)):
        assert datasets(task, world["roots"][task], crop, seed=7)[0].seed == 7


def test_eval_uses_the_training_crop(world, tmp_path):
    # a semseg model trained at --crop 64 is evaluated at the scale it trained and was evaluated at
    # during training, (256, 64), by eval.py too (it took the paper's (2048, 512) unless --demo)
    from safetensors import safe_open
    from safetensors.torch import save_file
    from vpd.tasks import build_eval
    ckpt = tmp_path / "model.safetensors"
    with safe_open(str(loss_run(world, "semseg") / "model.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["vpd"])
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(ckpt), metadata={"vpd": json.dumps(dict(meta, demo=False))})
    args = eval_script.get_args(["--ckpt", str(ckpt), "--data-root", world["roots"]["semseg"]])
    ev = build_eval(args, torch.device("cpu"))
    assert meta["args"]["crop"] == 64 and ev.dataset.scale == (256, 64) and ev.crop == 64  # and its windows


def test_a_moved_demo_run_is_evaluated_with_the_sd_file_and_data_beside_its_model(world, tmp_path):
    # a demo writes its SD file and synthetic data into its --out; moved elsewhere, eval.py and predict.py
    # (load_model) take those in the new folder, as train.py --resume does. Not so for a run that is no demo
    import shutil
    from safetensors import safe_open
    from safetensors.torch import save_file
    from vpd.tasks import build_eval, load_model
    run = tmp_path / "moved"
    run.mkdir()
    shutil.copy(world["sd"], run / "tiny_sd.safetensors")
    os.symlink(world["roots"]["depth"], run / "synthetic_depth")
    ckpt = str(run / "model.safetensors")
    with safe_open(str(loss_run(world, "depth") / "model.safetensors"), framework="pt") as f:
        meta = dict(json.loads(f.metadata()["vpd"]), sd_ckpt="/gone/tiny_sd.safetensors",
                    data_root="/gone/synthetic_depth")
        state = {k: f.get_tensor(k) for k in f.keys()}
    save_file(state, ckpt, metadata={"vpd": json.dumps(meta)})
    assert meta["demo"]
    ev = build_eval(eval_script.get_args(["--ckpt", ckpt]), torch.device("cpu"))
    assert ev.sd_ckpt == str(run / "tiny_sd.safetensors") and ev.data_root == str(run / "synthetic_depth")
    save_file(state, ckpt, metadata={"vpd": json.dumps(dict(meta, demo=False))})
    with pytest.raises(SystemExit, match="the SD checkpoint /gone/tiny_sd.safetensors .* is not there"):
        load_model(ckpt)


def test_official_depth_model_is_evaluated_with_vpds_scene_ids(world, tmp_path, monkeypatch):
    # VPD's NYU loader gives an image the first of its 27 names contained in "<dir>_<file>": the
    # released model saw study_room images as "study"; evaluating it must feed the same ids
    import shutil
    import vpd.tasks
    from vpd.data import NYU_SCENES
    root = tmp_path / "nyu"
    shutil.copytree(world["roots"]["depth"], root)
    test_dir = root / "official_splits" / "test"
    first = sorted(os.listdir(test_dir))[0]
    os.rename(test_dir / first, test_dir / "study_room")
    lines = (root / "test_list.txt").read_text().replace(f"/{first}/", "/study_room/")
    (root / "test_list.txt").write_text(lines)
    official = dict(task="depth", demo=False, dataset=None, depth_crop="eigen", official=True, sd_ckpt=None)
    for meta, scene in ((official, "study"), (dict(official, official=False), "study_room")):
        monkeypatch.setattr(vpd.tasks, "load_model", lambda *a, meta=meta: (torch.nn.Identity(), meta))
        args = eval_script.get_args(["--ckpt", "vpd_depth.ckpt", "--data-root", str(root)])
        ev = vpd.tasks.build_eval(args, torch.device("cpu"))
        ids = {NYU_SCENES[i] for i, s in zip(ev.dataset.scene_ids, lines.split("\n")) if "/study_room/" in s}
        assert ids == {scene}


def test_eval_flags_of_another_task_are_refused(world, tmp_path, monkeypatch):
    # before the model is loaded (it can take minutes): the task is the checkpoint header's, or --task
    monkeypatch.setattr(eval_script, "build_eval", lambda args, device: pytest.fail("loaded before the flags' check"))
    ckpt = str(loss_run(world, "depth") / "model.safetensors")
    for flag in (["--ms-flip"], ["--refer-full-res"], ["--split", "testA"], ["--split-by", "unc"],
                 ["--ms-flip", "--task", "depth"]):
        args = eval_script.get_args(["--ckpt", ckpt, "--out", str(tmp_path), *flag])
        with pytest.raises(SystemExit, match=f"{flag[0]} is only for the .* task, not depth"):
            eval_script.main(args)
    args = eval_script.get_args(["--ckpt", str(loss_run(world, "semseg") / "model.safetensors"), "--out",
                                 str(tmp_path), "--no-flip"])
    with pytest.raises(SystemExit, match="--no-flip is only for the depth task, not semseg"):
        eval_script.main(args)


def test_eval_writes_one_metrics_file_per_protocol(world, tmp_path):
    ckpt = str(loss_run(world, "depth") / "model.safetensors")
    for flag in ([], ["--no-flip"]):  # a second protocol must not overwrite the first one's results
        eval_script.main(eval_script.get_args(["--ckpt", ckpt, "--out", str(tmp_path), "--max-samples", "2",
                                               "--workers", "0", *flag]))
    a = json.load(open(tmp_path / "metrics_nyu_test_first2.json"))
    b = json.load(open(tmp_path / "metrics_nyu_test_noflip_first2.json"))
    assert (a["flip"], b["flip"]) == (True, False) and a["samples"] == b["samples"] == 2
    assert a["rmse"] != b["rmse"]
    refer = dict(dataset="refcocog", split_by="umd", split="val", ms_flip=False, flip=True, refer_full_res=False,
                 max_samples=None, amp="off")
    assert eval_script.metrics_name(refer) == "metrics_refcocog_umd_val.json"
    assert eval_script.metrics_name(dict(refer, split_by="google")) == "metrics_refcocog_google_val.json"
    assert eval_script.metrics_name(dict(refer, amp="bf16")) == "metrics_refcocog_umd_val_bf16.json"


def test_demo_resume_takes_its_own_files_named_relatively(world, tmp_path, monkeypatch):
    # the demo writes its SD file into --out; naming that file on --resume, relatively, is the same file
    monkeypatch.chdir(tmp_path)
    argv = [a for a in flags(world, "depth", "run", "--iters", 1, "--batch-size", 2, "--eval-max", 1)]
    i = argv.index("--sd-ckpt")
    del argv[i:i + 2]
    train_here(argv)
    train_here(argv + ["--resume", "--sd-ckpt", os.path.join("run", "tiny_sd.safetensors")])
    other = write_random_sd(str(tmp_path / "other.safetensors"), seed=1)
    with pytest.raises(SystemExit, match=r"other.safetensors is not the SD file the run in run started with "
                                         r"\(.*run/tiny_sd.safetensors\)"):
        train_here(argv + ["--resume", "--sd-ckpt", other])


def test_ctrl_c_after_an_evaluation_or_in_the_first_save_says_where_the_run_stands(world, tmp_path, monkeypatch):
    from vpd.trained import save_state
    interrupt_in_step(monkeypatch, 2)  # in step 2, after step 1's save and evaluation
    out = tmp_path / "after_eval"
    with pytest.raises(SystemExit) as e:
        train_here(flags(world, "depth", out, "--iters", 3, "--batch-size", 2, "--save-every", 1, "--eval-every", 1,
                         "--eval-max", 1))
    assert e.value.code == (f"interrupted in step 2; the checkpoint in {out} is at step 1: "
                            f"continue with --resume --out {out}")
    monkeypatch.undo()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "save_state",
                        lambda obj, path: interrupt() if obj["step"] == 1 else save_state(obj, path))
    out = tmp_path / "first_save"  # no earlier checkpoint: the new one, or none
    with pytest.raises(SystemExit) as e:
        train_here(flags(world, "depth", out, "--iters", 3, "--batch-size", 2, "--save-every", 1))
    assert e.value.code == (f"interrupted in the save after step 1; the checkpoint in {out} is at step 1, if the "
                            f"save got that far: continue with --resume --out {out}")


def test_eval_ms_flip_gives_the_dataset_vpds_ratios(world):
    from vpd.infer import MS_RATIOS
    from vpd.tasks import build_eval
    ckpt = str(loss_run(world, "semseg") / "model.safetensors")
    ev = build_eval(eval_script.get_args(["--ckpt", ckpt, "--ms-flip"]), torch.device("cpu"))
    assert tuple(ev.dataset.ms_ratios) == MS_RATIOS and len(ev.dataset[0]["ms_images"]) == len(MS_RATIOS)
    assert build_eval(eval_script.get_args(["--ckpt", ckpt]), torch.device("cpu")).dataset.ms_ratios is None


def test_semseg_lr_warms_up_linearly_from_1e_6(world, tmp_path):
    # mmcv's linear warmup over --warmup-iters on top of poly (power 1): the lr of step s (0-based) is
    # lr * (1 - s/iters) * (1 - (1 - s/warmup) * (1 - 1e-6)) during the warmup, lr * (1 - s/iters) after it
    train_here(flags(world, "semseg", tmp_path / "run", "--iters", 3, "--batch-size", 2, "--eval-max", 1,
                     "--lr", 1e-3, "--warmup-iters", 2))
    want = [1e-3 * 1e-6, 1e-3 * (2 / 3) * (1 - 0.5 * (1 - 1e-6)), 1e-3 / 3]
    assert [lr for _, _, lr in losses(tmp_path / "run")] == pytest.approx(want, rel=1e-9)


class NoSyncRecorder(torch.nn.Module):
    """Stands in for DistributedDataParallel: records in `synced`, per forward, whether its gradients would
    be all-reduced, and the forward's batch size."""

    def __init__(self, module, device_ids=None, synced=None):
        super().__init__()
        self.module, self.synced, self.in_no_sync = module, synced, False

    @contextmanager
    def no_sync(self):
        self.in_no_sync = True
        try:
            yield
        finally:
            self.in_no_sync = False

    def forward(self, *args):
        self.synced.append((not self.in_no_sync, len(args[0])))
        return self.module(*args)


def test_ddp_all_reduces_once_per_step_on_its_last_micro_batch(world, tmp_path, monkeypatch):
    # rank 0 of 2 processes, batch 8 of micro-batches of 2: 2 accumulated micro-batches per step; the
    # gradients are all-reduced in the backward of the last one only (no_sync on the ones before it).
    # Without --micro-batch each process takes its whole share, 4, in one forward
    from vpd import dist
    monkeypatch.setattr(dist, "setup", lambda device: (0, 2, torch.device("cpu")))
    synced, options = [], []
    monkeypatch.setattr(train, "DDP", lambda model, device_ids, **kw: options.append(kw)
                        or NoSyncRecorder(model, device_ids, synced))
    train_here(flags(world, "depth", tmp_path / "run", "--iters", 2, "--batch-size", 8, "--micro-batch", 2,
                     "--eval-max", 1))
    assert synced == [(False, 2), (True, 2), (False, 2), (True, 2)]
    synced.clear()
    train_here(flags(world, "depth", tmp_path / "whole", "--iters", 1, "--batch-size", 8, "--eval-max", 1))
    assert synced == [(True, 4)]
    assert options == [dict(gradient_as_bucket_view=True)] * 2  # the gradients kept in DDP's buckets, not copied


def test_depth_recipe_sets_three_images_per_forward(world, tmp_path, monkeypatch):
    # VPD's SILog and BatchNorm see 3 images per GPU: the recipe keeps that on any number of processes
    # (the demo and the other tasks take batch / processes; --micro-batch overrides)
    from vpd import dist
    monkeypatch.setattr(dist, "setup", lambda device: (0, 2, torch.device("cpu")))
    recipe = ["--task", "depth", "--sd-ckpt", world["sd"], "--data-root", world["roots"]["depth"], "--out",
              str(tmp_path / "run")]
    assert train.get_args(recipe).micro_batch == 3
    assert train.get_args(recipe + ["--micro-batch", "6"]).micro_batch == 6
    assert train.get_args(recipe + ["--task", "semseg"]).micro_batch is None
    assert train.get_args(["--demo", "--task", "depth"]).micro_batch is None
    with pytest.raises(SystemExit, match="--batch-size 8 does not split evenly over 2 processes x --micro-batch 3; "
                       "the depth recipe forwards 3 images per process"):
        train_here(recipe + ["--batch-size", "8"])


def test_semseg_refuses_a_batchnorm_over_one_value(world, tmp_path):
    # at --crop 64 the FPN head's 1/64 map is 1x1: one image per forward leaves its BatchNorm one value
    with pytest.raises(SystemExit, match="--crop 64 with 1 image per forward: the semseg head's BatchNorm"):
        train_here(flags(world, "semseg", tmp_path / "one", "--iters", 1, "--batch-size", 1))
    assert not (tmp_path / "one" / "state.pt").exists()
    train_here(flags(world, "semseg", tmp_path / "two", "--iters", 1, "--batch-size", 2, "--eval-max", 1))


def test_a_batch_must_split_over_the_processes(tmp_path, monkeypatch):
    # 2 processes x micro-batches of 2 take 4, 8, ... images per step: 6 would silently train on 4
    from vpd import dist
    monkeypatch.setattr(dist, "setup", lambda device: (0, 2, torch.device("cpu")))
    args = train.get_args(["--demo", "--out", str(tmp_path), "--batch-size", "6", "--micro-batch", "2"])
    with pytest.raises(SystemExit, match="--batch-size 6 does not split evenly over 2 processes x --micro-batch 2"):
        train.main(args)
    args = train.get_args(["--demo", "--out", str(tmp_path), "--batch-size", "3"])
    with pytest.raises(SystemExit, match="--batch-size 3 does not split evenly over 2 processes"):
        train.main(args)


def test_each_process_seeds_torch_with_the_runs_seed_plus_its_rank(tmp_path, monkeypatch):
    # model initialisation and dropout follow --seed; processes differ in their dropout
    from vpd import dist
    seeds = []

    class Built(Exception):
        pass

    def record(*args, **kwargs):
        seeds.append(torch.initial_seed())
        raise Built
    monkeypatch.setattr(train, "build_task", record)
    for rank in (0, 1):
        monkeypatch.setattr(dist, "setup", lambda device, rank=rank: (rank, 2, torch.device("cpu")))
        with pytest.raises(Built):
            train.main(train.get_args(["--demo", "--out", str(tmp_path / str(rank)), "--seed", "5",
                                       "--batch-size", "4"]))
    assert seeds == [5, 6]


def test_the_seed_picks_the_data_order(world, tmp_path, monkeypatch):
    # the order of the training images is the permutation of (--seed, epoch): another seed, another order
    orders = {}

    def recording(model, raw, task, batch):
        orders.setdefault(seed, []).extend(batch["index"].tolist())
        return forward_loss(model, raw, task, batch)
    forward_loss = train.forward_loss
    monkeypatch.setattr(train, "forward_loss", recording)
    for seed in (0, 1):
        argv = flags(world, "depth", tmp_path / str(seed), "--epochs", 1, "--batch-size", 4, "--eval-max", 1)
        argv[argv.index("--seed") + 1] = str(seed)
        train_here(argv)
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(12)) and orders[0] != orders[1]


def test_an_epoch_drops_the_last_partial_batch(world, tmp_path, monkeypatch):
    # 12 training images in batches of 5: 2 steps per epoch, 10 different images each epoch
    seen = []

    def recording(model, raw, task, batch):
        seen.append(batch["index"].tolist())
        return forward_loss(model, raw, task, batch)
    forward_loss = train.forward_loss
    monkeypatch.setattr(train, "forward_loss", recording)
    train_here(flags(world, "depth", tmp_path / "run", "--epochs", 2, "--batch-size", 5, "--eval-max", 1))
    assert [s for s, _, _ in losses(tmp_path / "run")] == [1, 2, 3, 4]
    assert all(len(set(seen[2 * e] + seen[2 * e + 1])) == 10 for e in range(2))


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_a_non_finite_loss_stops_the_run_at_its_log_line(world, tmp_path, monkeypatch, poison):
    # the loss is checked at each log line: a diverged run stops there, not at its next checkpoint. An
    # fp16 overflow gives inf: its scaler skips the update, the weights stay finite, no save would stop it
    from vpd.tasks import forward_loss
    calls = []

    def poisoned_from_third(model, raw, task, batch):
        calls.append(1)
        loss = forward_loss(model, raw, task, batch)
        return loss * float(poison) if len(calls) >= 3 else loss
    monkeypatch.setattr(train, "forward_loss", poisoned_from_third)
    with pytest.raises(SystemExit) as e:
        train_here(flags(world, "depth", tmp_path / "run", "--iters", 6, "--batch-size", 2))
    assert len(calls) == 3
    # what is left, and advice that fits the run: bf16 only helps where fp16 overflowed
    assert e.value.code == f"loss is {poison} at step 3: stopping; no checkpoint was written (lower --lr)"
    calls.clear()
    with pytest.raises(SystemExit) as e:
        train_here(flags(world, "depth", tmp_path / "run2", "--iters", 6, "--batch-size", 2, "--save-every", 2,
                         "--amp", "fp16"))
    assert e.value.code == (f"loss is {poison} at step 3: stopping; the checkpoint in {tmp_path / 'run2'} is at "
                            "step 2 (lower --lr, or use --amp bf16 (fp16 overflows))")


def test_ctrl_c_after_a_resume_names_the_checkpoint_it_resumed_from(world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = flags(world, "depth", out, "--iters", 3, "--batch-size", 2, "--eval-max", 1)
    train_here(args + ["--stop-after", "1"])
    interrupt_in_step(monkeypatch, 1)  # in step 2, the resumed run's first
    with pytest.raises(SystemExit) as e:
        train_here(args + ["--resume"])
    assert e.value.code == (f"interrupted in step 2; the checkpoint in {out} is at step 1: "
                            f"continue with --resume --out {out}")


def test_resuming_a_finished_run_says_so_and_changes_nothing(world, tmp_path, capsys):
    # trained and evaluated to its last step: said so, and no file is written again (a run whose last
    # evaluation or weights file was lost is completed instead: the crash tests above)
    out = tmp_path / "run"
    args = flags(world, "depth", out, "--iters", 2, "--batch-size", 2, "--eval-max", 1)
    train_here(args)
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    capsys.readouterr()
    train_here(args + ["--resume"])
    assert capsys.readouterr().out.endswith(f"--resume: the run in {out} is complete (step 2, evaluated): "
                                            "nothing to do\n")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == files


def test_a_plot_torn_at_the_end_is_drawn_again_on_resume(world, tmp_path, monkeypatch):
    # killed while curves.png is written: no torn plot (nor its temporary) is left to pass for a finished
    # run, and --resume draws it
    from PIL import Image
    out = tmp_path / "run"
    args = flags(world, "depth", out, "--iters", 2, "--batch-size", 2, "--eval-max", 1)
    save = Image.Image.save

    def torn(self, fp, *a, **k):
        open(fp, "wb").write(b"\x89PNG half")
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        train_here(args)
    assert not any(name.startswith("curves.png") for name in os.listdir(out))
    monkeypatch.setattr(Image.Image, "save", save)
    train_here(args + ["--resume"])
    with Image.open(out / "curves.png") as im:
        assert im.size[0] > 0


def test_stop_after_past_the_end_ends_at_the_end(world, tmp_path):
    # --stop-after beyond --iters: the run is over at --iters, evaluated there like any finished run
    out = tmp_path / "run"
    train_here(flags(world, "depth", out, "--iters", 2, "--batch-size", 2, "--eval-max", 1, "--stop-after", 5))
    assert [r["step"] for r in records(out)] == [1, 2, 2]  # two loss lines and the evaluation
    assert torch.load(out / "state.pt", weights_only=False)["step"] == 2
