import pytest

from vpd.sampler import GlobalBatchSampler, ShardedEvalSampler


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


def test_micro_batch_order_is_the_same_for_any_split_of_a_global_batch():
    # micro-batch a * world + rank: 4 ranks, 2 ranks x 2 accumulations and 1 rank x 4 see one sequence
    four = batches(40, micro=2, world=4, accum=1)
    assert four == batches(40, micro=2, world=2, accum=2) == batches(40, micro=2, world=1, accum=4)


def test_len_is_the_number_of_micro_batches_yielded():
    for start in (0, 2):
        s = GlobalBatchSampler(50, 2, 2, 1, 3, seed=0, epoch=0, start_step=start)
        assert len(s) == len(list(s)) == (50 // 12 - start) * 3  # 4 steps of 12, 3 micro-batches each


def test_seed_and_epoch_do_not_alias():
    # seed 0's second epoch must not replay seed 1's first
    assert list(GlobalBatchSampler(20, 2, 1, 0, 1, seed=1, epoch=0)) != \
        list(GlobalBatchSampler(20, 2, 1, 0, 1, seed=0, epoch=1))


def test_sharded_eval_sampler_refuses_a_negative_length():
    with pytest.raises(ValueError, match="dataset_len"):
        ShardedEvalSampler(-1, 0, 1)
    assert list(ShardedEvalSampler(0, 0, 1)) == []  # an empty set is fine
