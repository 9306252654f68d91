"""Images/s of each task's training input pipeline (decode + augment + collate) on synthetic data.

    python bench_loader.py                      # NYU-sized depth, ADE-style semseg, RefCOCO-style refer
    python bench_loader.py --n 64 --workers 0 2 4
"""
import argparse
import os
import tempfile
import time

from torch.utils.data import DataLoader

from eval import count
from vpd.clip import Tokenizer
from vpd.data import ADE20K, NYUv2, RefCOCO
from vpd.synthetic import make_synthetic


def images_per_second(ds, workers, batch_size, epochs):
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, shuffle=True, drop_last=True,
                        persistent_workers=workers > 0)
    for _ in loader:  # one untimed epoch: starts the workers, and leaves no prefetched batch to count
        pass
    t0, n = time.perf_counter(), 0
    for epoch in range(epochs):
        ds.set_epoch(epoch)  # seen by workers only when they restart; fine for timing
        for batch in loader:
            n += batch["image"].shape[0]
    return n / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=count(1), default=32, help="synthetic images per task")
    ap.add_argument("--size", type=count(32), default=640, help="image width (height 3/4 of it; 640 -> NYU's 480x640)")
    ap.add_argument("--batch-size", type=count(1), default=4)
    ap.add_argument("--epochs", type=count(1), default=2)
    ap.add_argument("--workers", type=count(0), nargs="+", default=[0, 2])
    ap.add_argument("--out", default=None, help="where to write the synthetic data (default: a temp dir)")
    args = ap.parse_args(argv)

    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="vpd_bench_")
    out = args.out or tmp.name
    t0 = time.perf_counter()
    roots = {task: make_synthetic(os.path.join(out, task), task, args.n, size=args.size)
             for task in ("depth", "semseg", "refer")}
    print(f"wrote {3 * args.n} synthetic images ({args.size * 3 // 4}x{args.size}) in "
          f"{time.perf_counter() - t0:.1f} s to {out}")
    crop = min(480, args.size * 3 // 4)
    datasets = {
        f"depth (NYU recipe, {crop}x{crop} crop)": NYUv2(roots["depth"], crop=(crop, crop)),
        "semseg (mmseg ADE20K recipe, 512)": ADE20K(roots["semseg"]),
        "refer (resize 512)": RefCOCO(roots["refer"], tokenizer=Tokenizer()),
    }
    for name, ds in datasets.items():  # whole batches only are timed: a smaller set would time nothing
        if len(ds) < args.batch_size:
            raise SystemExit(f"{name}: {len(ds)} training images of --n {args.n}, fewer than --batch-size "
                             f"{args.batch_size}: give a larger --n")
    print(f"{'pipeline':36s} {'images':>6s} " + " ".join(f"{f'{w} workers':>12s}" for w in args.workers))
    for name, ds in datasets.items():
        rates = [images_per_second(ds, w, args.batch_size, args.epochs) for w in args.workers]
        print(f"{name:36s} {len(ds):6d} " + " ".join(f"{r:8.1f} im/s" for r in rates))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
