"""The rerank token cache: fp16/int8 round trips, shards, torn tails, checked records."""

from __future__ import annotations

import numpy as np
import pytest

from vtfusion.indexer.tokens import HEADER, CorruptRecordError, TokenCache


def test_fp16_round_trip_and_shards(tmp_path):
    rng = np.random.default_rng(0)
    cache = TokenCache(tmp_path, num_tokens=5, width=7, dtype="fp16", shard_records=4)
    t = rng.normal(size=(10, 5, 7)).astype(np.float32)
    locs = cache.append(t[:6]) + cache.append(t[6:])
    assert locs[:5] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)] and locs[-1] == (2, 1)
    assert cache.record_bytes == HEADER + 5 * 7 * 2 and cache.total_records() == 10
    np.testing.assert_allclose(cache.read(locs), t, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(cache.read([locs[7], locs[2]]), cache.read(locs)[[7, 2]])


def test_int8_is_half_the_bytes_and_close(tmp_path):
    rng = np.random.default_rng(1)
    t = rng.normal(size=(4, 9, 16)).astype(np.float32)
    c8 = TokenCache(tmp_path / "a", 9, 16, dtype="int8")
    c16 = TokenCache(tmp_path / "b", 9, 16, dtype="fp16")
    assert c8.record_bytes == HEADER + 9 * 16 + 9 * 4 < c16.record_bytes
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


H = [f"{i:02x}" * 32 for i in range(12)]  # content hashes


def test_legacy_format_has_no_header_and_reads_back(tmp_path):
    rng = np.random.default_rng(3)
    t = rng.normal(size=(3, 5, 7)).astype(np.float32)
    old = TokenCache(tmp_path, 5, 7, fmt=1)
    assert old.record_bytes == 5 * 7 * 2
    np.testing.assert_allclose(old.read(old.append(t)), t, atol=1e-2)


def test_a_failed_write_leaves_no_partial_record_and_the_retry_lands_where_it_says(tmp_path, monkeypatch):
    """ENOSPC mid-record, then a retry in the same long-lived process: with blind appends the
    retried records landed after the half record, every later offset off by a fraction."""
    import errno
    import os

    from vtfusion.indexer import tokens as tokens_mod

    rng = np.random.default_rng(4)
    t = rng.normal(size=(6, 5, 7)).astype(np.float32)
    cache = TokenCache(tmp_path, 5, 7)
    first = cache.append(t[:2], H[:2])
    real_pwrite = os.pwrite

    def half_then_full(fd, data, offset):
        real_pwrite(fd, bytes(data)[: len(data) // 3], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tokens_mod.os, "pwrite", half_then_full)
    with pytest.raises(OSError, match="No space"):
        cache.append(t[2:4], H[2:4])
    monkeypatch.undo()
    assert cache.total_records() == 2 and (tmp_path / "shard-00000.bin").stat().st_size == 2 * cache.record_bytes
    again = cache.append(t[2:6], H[2:6])
    assert again == [(0, 2), (0, 3), (0, 4), (0, 5)]
    np.testing.assert_allclose(cache.read(first + again, H[:6]), t, atol=1e-2)


def test_a_torn_tail_left_by_another_writer_is_cut_before_the_next_append(tmp_path):
    """A second writer killed mid-record after this process opened the cache: the torn bytes are
    cut under the lock before appending, so offsets stay where the bytes are."""
    rng = np.random.default_rng(5)
    t = rng.normal(size=(4, 5, 7)).astype(np.float32)
    cache = TokenCache(tmp_path, 5, 7)  # opened (tail repaired) before the other writer dies
    locs = cache.append(t[:1], H[:1])
    with open(tmp_path / "shard-00000.bin", "ab") as f:
        f.write(cache.encode(t[1:2], H[1:2]).tobytes()[:40])  # the other writer's half record
    locs += cache.append(t[2:4], H[2:4])
    assert locs == [(0, 0), (0, 1), (0, 2)]
    np.testing.assert_allclose(cache.read(locs, [H[0], H[2], H[3]]), t[[0, 2, 3]], atol=1e-2)


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_checks_catch_flipped_bytes_another_items_record_and_truncation(tmp_path, dtype):
    rng = np.random.default_rng(6)
    t = rng.normal(size=(4, 5, 7)).astype(np.float32)
    cache = TokenCache(tmp_path, 5, 7, dtype=dtype)
    locs = cache.append(t, H[:4])
    _, ok = cache.read_checked(locs, H[:4])
    assert ok.all()
    _, ok = cache.read_checked(locs, [H[1], H[0], H[2], None])  # records swapped between items; None: tag not checked
    assert ok.tolist() == [False, False, True, True]
    path = tmp_path / "shard-00000.bin"
    raw = bytearray(path.read_bytes())
    raw[2 * cache.record_bytes + HEADER + 3] ^= 0x40  # one bit of record 2's payload
    path.write_bytes(bytes(raw))
    cache = TokenCache(tmp_path, 5, 7, dtype=dtype)
    tokens, ok = cache.read_checked(locs, H[:4])
    assert ok.tolist() == [True, True, False, True] and not tokens[2].any()
    with pytest.raises(CorruptRecordError) as e:
        cache.read(locs, H[:4])
    assert e.value.bad == [2]
    with open(path, "r+b") as f:
        f.truncate(cache.record_bytes * 3 - 5)  # record 2 torn, record 3 gone
    cache = TokenCache(tmp_path, 5, 7, dtype=dtype)
    _, ok = cache.read_checked(locs + [(7, 0)], H[:4] + [None])  # and a shard that never existed
    assert ok.tolist() == [True, True, False, False, False]


def test_a_record_of_another_model_fails_its_check(tmp_path):
    """The tag binds a record to its item AND the model (salt = fingerprint): a token folder
    copied from a collection of another model, same catalog, is never read as this model's."""
    rng = np.random.default_rng(7)
    t = rng.normal(size=(2, 5, 7)).astype(np.float32)
    locs = TokenCache(tmp_path, 5, 7, salt="model-a").append(t, H[:2])
    _, ok = TokenCache(tmp_path, 5, 7, salt="model-b").read_checked(locs, H[:2])
    assert not ok.any()
    _, ok = TokenCache(tmp_path, 5, 7, salt="model-a").read_checked(locs, H[:2])
    assert ok.all()
