from vpd.sampler import GlobalBatchSampler


def batches(n, micro, world, accum, epoch=0, start=0):
    """Micro-batches per optimizer step, in chunk order (accum-major, then rank)."""
    per_rank = [list(GlobalBatchSampler(n, micro, world, r, accum, seed=1, epoch=epoch, start_step=start))
                for r in range(world)]
    steps = len(per_rank[0]) // accum
    return [[per_rank[r][s * accum + a] for a in range(accum) for r in range(world)] for s in range(steps)]


def test_split_does_not_change_the_global_batches():
    a = batches(50, micro=2, world=2, accum=1)
    b = batches(50, micro=2, world=1, accum=2)
    assert a == b and len(a) == 12  # 50 // 4 steps; partial batch dropped
    flat = [i for step in a for mb in step for i in mb]
    assert len(set(flat)) == len(flat) == 48 and set(flat) <= set(range(50))


def test_resume_continues_the_same_batches_and_epochs_differ():
    full = batches(40, micro=2, world=2, accum=2)
    assert batches(40, micro=2, world=2, accum=2, start=3) == full[3:]
    assert batches(40, micro=2, world=2, accum=2, epoch=1) != full


def test_ranks_and_accumulation_steps_share_out_an_epoch():
    # 2 ranks x 2 accumulated micro-batches of 2: every sample of the epoch once, none twice
    n, micro, world, accum = 48, 2, 2, 2
    seen = [i for rank in range(world)
            for batch in GlobalBatchSampler(n, micro, world, rank, accum, seed=0, epoch=0) for i in batch]
    assert sorted(seen) == list(range(n))
