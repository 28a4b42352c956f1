"""The rerank token cache: fp16/int8 round trips, shards, torn tails."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.tokens import TokenCache


def test_fp16_round_trip_and_shards(tmp_path):
    rng = np.random.default_rng(0)
    cache = TokenCache(tmp_path, num_tokens=5, width=7, dtype="fp16", shard_records=4)
    t = rng.normal(size=(10, 5, 7)).astype(np.float32)
    locs = cache.append(t[:6]) + cache.append(t[6:])
    assert locs[:5] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)] and locs[-1] == (2, 1)
    assert cache.record_bytes == 5 * 7 * 2 and cache.total_records() == 10
    np.testing.assert_allclose(cache.read(locs), t, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(cache.read([locs[7], locs[2]]), cache.read(locs)[[7, 2]])


def test_int8_is_half_the_bytes_and_close(tmp_path):
    rng = np.random.default_rng(1)
    t = rng.normal(size=(4, 9, 16)).astype(np.float32)
    c8 = TokenCache(tmp_path / "a", 9, 16, dtype="int8")
    c16 = TokenCache(tmp_path / "b", 9, 16, dtype="fp16")
    assert c8.record_bytes == 9 * 16 + 9 * 4 < c16.record_bytes
    back = c8.read(c8.append(t))
    err = np.abs(back - t).max(axis=2) / np.abs(t).max(axis=2)  # per token, relative to its max
    assert err.max() <= 0.5 / 127 + 1e-6


def test_torn_tail_is_cut_on_open(tmp_path):
    cache = TokenCache(tmp_path, 3, 4)
    cache.append(np.ones((2, 3, 4), np.float32))
    with open(tmp_path / "shard-00000.bin", "ab") as f:
        f.write(b"\x01\x02\x03")  # a crash mid-record
    cache = TokenCache(tmp_path, 3, 4)
    assert cache.total_records() == 2
    assert cache.append(np.zeros((1, 3, 4), np.float32)) == [(0, 2)]
    np.testing.assert_array_equal(cache.read([(0, 2)]), np.zeros((1, 3, 4)))


def test_wrong_shape_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\(B, 3, 4\)"):
        TokenCache(tmp_path, 3, 4).append(np.zeros((1, 3, 5), np.float32))


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_a_reader_sees_records_appended_after_it_mapped_the_shard(tmp_path, dtype):
    rng = np.random.default_rng(2)
    t = rng.normal(size=(6, 5, 7)).astype(np.float32)
    writer = TokenCache(tmp_path, 5, 7, dtype=dtype, shard_records=4)
    reader = TokenCache(tmp_path, 5, 7, dtype=dtype, shard_records=4)  # another process
    locs = writer.append(t[:2])
    first = reader.read(locs)  # maps shard 0 at 2 records
    locs += writer.append(t[2:])  # shard 0 grows to 4, shard 1 appears
    both = reader.read(locs)  # offsets past the old map: remapped, not an IndexError
    np.testing.assert_array_equal(both[:2], first)
    np.testing.assert_array_equal(both, writer.read(locs))
    # one-shard reads (decoded straight into the output) equal the same records read across shards
    np.testing.assert_array_equal(reader.read(locs[:4]), both[:4])
    np.testing.assert_array_equal(reader.read([locs[5], locs[1]]), both[[5, 1]])
