"""The receive pool's allocator (mmgraph_workers.transfer.Pool): aligned allocation and coalescing of freed
ranges, with no NIXL."""

from __future__ import annotations

from mmgraph_workers.transfer import Pool


def test_pool_allocates_aligned_and_coalesces():
    pool = Pool(4096)
    a, b, c = pool.alloc(100), pool.alloc(300), pool.alloc(256)
    assert (a, b, c) == (0, 256, 768)
    assert pool.alloc(4096) is None
    pool.release(b, 300)
    pool.release(a, 100)
    assert pool.alloc(512) == 0  # the two freed neighbours merged
    pool.release(0, 512)
    pool.release(c, 256)
    assert pool.free == [(0, 4096)] and pool.used() == 0
