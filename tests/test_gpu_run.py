"""tools/gpu_run.sh, run with stand-ins for python3, torchrun, timeout and nvidia-smi that record each command:
every part's commands are accepted by the scripts they call. A GPU session is short; a mistyped flag there
costs one of its few calls."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import bench_kernels
import train

ROOT = Path(__file__).resolve().parent.parent
PARTS = ["eager", "compiled", "graphs", "graphs 2 16", "unet", "unet 2 16", "kernels", "profile", "sweep", "evalms",
         "ddp", "ddp 2 16", "ddpgraphs"]


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    """{part: [argv of each python3 / torchrun command it runs]}"""
    tmp = tmp_path_factory.mktemp("gpu_run")
    bin_dir, log = tmp / "bin", tmp / "commands.jsonl"
    bin_dir.mkdir()
    record = f"#!{sys.executable}\nimport json, os, sys\n" \
             f"argv = [os.path.basename(sys.argv[0])] + sys.argv[1:]\n" \
             f"open({str(log)!r}, 'a').write(json.dumps(argv) + '\\n')\n"
    for name in ("python3", "torchrun"):
        (bin_dir / name).write_text(record)
    (bin_dir / "timeout").write_text('#!/bin/sh\nshift\nexec "$@"\n')  # timeout SECONDS COMMAND...
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'name, memory.total, driver_version'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp))  # TMPDIR: the demo part's scratch
    out = {}
    for part in PARTS:
        log.write_text("")
        run = subprocess.run(["bash", "tools/gpu_run.sh", *part.split()], cwd=ROOT,
                             env=dict(env, OUT=str(tmp / part.replace(" ", "_"))),
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        out[part] = [json.loads(line) for line in log.read_text().splitlines()]
    return out


def test_every_part_runs_commands_and_an_unknown_part_is_refused(commands):
    assert all(commands[part] for part in PARTS)
    run = subprocess.run(["bash", "tools/gpu_run.sh", "nonsense"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, OUT="/nonexistent/out"))
    assert run.returncode == 2 and "usage" in run.stderr


@pytest.mark.parametrize("part", PARTS)
def test_each_command_is_accepted_by_its_script(part, commands, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for tool, script, *argv in commands[part]:
        if tool == "torchrun":  # torchrun --nproc_per_node=N train.py ...
            assert script.startswith("--nproc_per_node=") and argv[0] == "train.py"
            args = train.get_args(argv[1:])
            assert args.device == "cuda"
        elif script == "bench.py":
            args = bench.parse_args(argv)
            assert args.device == "cuda" and args.size == "full" and args.res == 512
        elif script == "bench_kernels.py":  # parsed, then refused for want of a GPU: its flags were taken
            with pytest.raises(SystemExit, match="no CUDA device visible"):
                bench_kernels.main(argv)
        else:
            assert (script, argv) == ("tools/gpu_check.py", [])


def batches(commands, part):
    return [int(argv[argv.index("--batch") + 1]) for argv in commands[part]]


def test_graphs_sweep_and_ddp_run_each_batch_given(commands):
    assert batches(commands, "graphs") == [2] and batches(commands, "graphs 2 16") == [2, 16]
    assert all("reduce-overhead" in argv and "train_semseg" in argv for argv in commands["graphs 2 16"])
    assert batches(commands, "sweep") == [2, 8]
    assert batches(commands, "ddp") == [2] and batches(commands, "ddp 2 16") == [2, 16]
    assert all("--ddp" in argv for argv in commands["ddp 2 16"])


def test_unet_part_times_the_unet_under_graphs_at_each_batch(commands):
    assert batches(commands, "unet 2 16") == [2, 16] and batches(commands, "unet") == [16]
    assert all("unet_fwdbwd" in argv and "reduce-overhead" in argv for argv in commands["unet 2 16"])
