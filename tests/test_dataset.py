import random
from pathlib import Path

import pytest
import torch

from conftest import write_flac
from edgeconformer.data.dataset import ASRDataset, DurationBucketSampler, collate, filter_by_duration
from edgeconformer.data.tokenizer import Tokenizer, train_tokenizer
from edgeconformer.errors import UserError
from edgeconformer.files import write_jsonl_atomic

TEXTS = [
    "AND THE LORD SAID",
    "IN THE BEGINNING WAS THE WORD",
    "LET THERE BE LIGHT",
    "AND THERE WAS LIGHT",
    "THE EARTH WAS WITHOUT FORM",
    "AND GOD SAW THE LIGHT THAT IT WAS GOOD",
    "HE CALLED THE DRY LAND EARTH",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(train_tokenizer(TEXTS * 3, tmp_path_factory.mktemp("tok"), vocab_size=30, model_type="char"))


@pytest.fixture
def rows(tmp_path):
    out = []
    for i, (seconds, text) in enumerate(zip([0.5, 0.8, 0.3, 1.1, 0.6], TEXTS)):
        uid = f"7-8-{i:04d}"
        path = write_flac(tmp_path / "audio" / f"{uid}.flac", seconds=seconds, seed=i)
        out.append(
            {"id": uid, "audio_filepath": str(path), "duration": seconds, "text": text, "speaker": "7", "chapter": "8"}
        )
    return out


# ---------------------------------------------------------------- dataset


def test_items(rows, tokenizer):
    ds = ASRDataset(rows, tokenizer)
    assert len(ds) == len(rows) and ds.dropped_ids == []
    for i, row in enumerate(rows):
        item = ds[i]
        assert item["id"] == row["id"] and item["text"] == row["text"]
        assert item["audio"].dtype == torch.float32 and item["audio"].shape == (round(row["duration"] * 16000),)
        assert item["tokens"].dtype == torch.long
        assert tokenizer.decode(item["tokens"].tolist()) == row["text"]


def test_duration_filter_reports_dropped(rows, tokenizer):
    ds = ASRDataset(rows, tokenizer, min_duration=0.4, max_duration=1.0)
    assert ds.dropped_ids == ["7-8-0002", "7-8-0003"]
    assert [ds[i]["id"] for i in range(len(ds))] == ["7-8-0000", "7-8-0001", "7-8-0004"]
    kept, dropped = filter_by_duration(rows, max_duration=0.5)
    assert len(kept) + len(dropped) == len(rows) and {r["id"] for r in dropped} == {"7-8-0001", "7-8-0003", "7-8-0004"}


def test_corrupt_audio_names_file_and_manifest(rows, tokenizer, tmp_path):
    bad = tmp_path / "audio" / "7-8-0001.flac"
    bad.write_bytes(b"definitely not flac" * 10)
    manifest = tmp_path / "train.jsonl"
    write_jsonl_atomic(manifest, rows)
    ds = ASRDataset.from_manifest(manifest, tokenizer)
    with pytest.raises(UserError) as e:
        ds[1]
    msg = str(e.value)
    assert str(bad) in msg and str(manifest) in msg and "7-8-0001" in msg and "prepare" in msg
    bad.unlink()
    with pytest.raises(UserError, match="missing or corrupt"):
        ds[1]


def test_wrong_sample_rate_and_channels(rows, tokenizer):
    write_flac(Path(rows[0]["audio_filepath"]), seconds=0.5, sr=8000)
    write_flac(Path(rows[1]["audio_filepath"]), seconds=0.5, channels=2)
    ds = ASRDataset(rows, tokenizer, manifest="dev.jsonl")
    with pytest.raises(UserError, match=r"dev.jsonl: utterance 7-8-0000: .*8000 Hz, expected 16000 Hz"):
        ds[0]
    with pytest.raises(UserError, match="2 channels"):
        ds[1]


def test_missing_manifest_fields(tokenizer):
    with pytest.raises(UserError, match="lacks"):
        ASRDataset([{"id": "x", "text": "A"}], tokenizer, manifest="m.jsonl")


def test_collate_shapes_and_padding(rows, tokenizer):
    ds = ASRDataset(rows, tokenizer)
    items = [ds[i] for i in (0, 3, 2)]
    batch = collate(items)
    n = [len(it["audio"]) for it in items]
    u = [len(it["tokens"]) for it in items]
    assert batch["ids"] == [it["id"] for it in items] and batch["texts"] == [it["text"] for it in items]
    assert batch["audio"].shape == (3, max(n)) and batch["tokens"].shape == (3, max(u))
    assert batch["audio_lengths"].tolist() == n and batch["token_lengths"].tolist() == u
    for i, it in enumerate(items):
        assert torch.equal(batch["audio"][i, : n[i]], it["audio"]) and (batch["audio"][i, n[i] :] == 0).all()
        assert torch.equal(batch["tokens"][i, : u[i]], it["tokens"]) and (batch["tokens"][i, u[i] :] == -1).all()


def test_a_loader_as_training_builds_it_covers_every_kept_utterance(rows, tokenizer):
    from torch.utils.data import DataLoader

    dataset = ASRDataset(rows, tokenizer, max_duration=1.0)
    assert dataset.dropped_ids == ["7-8-0003"]
    loader = DataLoader(
        dataset, collate_fn=collate, batch_sampler=DurationBucketSampler(dataset.durations, 1.5, shuffle=True, seed=1)
    )
    ids = []
    for batch in loader:
        assert len(batch["ids"]) * batch["audio"].shape[1] / 16000 <= 1.5 + 1e-9
        ids += batch["ids"]
    assert sorted(ids) == sorted(r["id"] for r in rows if r["duration"] <= 1.0)
    assert len(loader) == len(loader.batch_sampler)


# ---------------------------------------------------------------- sampler


@pytest.fixture(scope="module")
def durations():
    rng = random.Random(0)
    return [round(rng.uniform(0.5, 20.0), 2) for _ in range(997)] + [45.0, 60.0]  # two over the 40 s cap


def test_sampler_covers_each_index_once_and_respects_cap(durations):
    sampler = DurationBucketSampler(durations, 40.0, max_batch_size=16, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(durations)))
        for b in batches:
            assert len(b) <= 16
            if len(b) > 1:
                assert len(b) * max(durations[i] for i in b) <= 40.0
        assert [45.0] in [[durations[i] for i in b] for b in batches]  # over the cap: alone


def test_sampler_deterministic_per_seed_and_epoch(durations):
    a = DurationBucketSampler(durations, 60.0, seed=5)
    b = DurationBucketSampler(durations, 60.0, seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    assert sorted(map(sorted, a.batches(2))) != sorted(map(sorted, a.batches(3)))  # new compositions, not just order
    assert list(DurationBucketSampler(durations, 60.0, seed=6)) != list(DurationBucketSampler(durations, 60.0, seed=5))


def test_sampler_sorted_without_shuffle(durations):
    sampler = DurationBucketSampler(durations, 60.0, shuffle=False)
    first = list(sampler)
    sampler.set_epoch(4)
    assert list(sampler) == first
    flat = [durations[i] for b in first for i in b]
    assert flat == sorted(flat)


def test_sampler_length_is_epoch_invariant(durations):
    sampler = DurationBucketSampler(durations, 30.0, seed=0)
    lengths = set()
    for epoch in range(5):
        sampler.set_epoch(epoch)
        lengths.add(len(list(sampler)))
    assert lengths == {len(sampler)}


@pytest.mark.parametrize("replicas", [2, 3])
def test_sampler_replicas_disjoint_equal(durations, replicas):
    total = DurationBucketSampler(durations, 50.0, seed=9).batches(epoch=1)
    shards = []
    for rank in range(replicas):
        s = DurationBucketSampler(durations, 50.0, seed=9, num_replicas=replicas, rank=rank)
        s.set_epoch(1)
        shards.append(list(s))
        assert len(shards[-1]) == len(s)
    assert len({len(s) for s in shards}) == 1  # equal counts
    # dealt out round-robin from the shared list, padded by repeating its head
    pad = len(shards[0]) * replicas - len(total)
    assert 0 <= pad < replicas
    dealt = [shards[k % replicas][k // replicas] for k in range(len(shards[0]) * replicas)]
    assert dealt == total + total[:pad]
    # disjoint apart from the padding, and together they cover every index
    unpadded = [[i for b in shard for i in b] for shard in shards]
    flat = [i for b in dealt[: len(total)] for i in b]
    assert sorted(flat) == list(range(len(durations)))
    for r in range(replicas):
        for q in range(r + 1, replicas):
            assert not (set(unpadded[r]) & set(unpadded[q])) - {i for b in total[:pad] for i in b}


def test_sampler_sparse_durations_still_fill_batches():
    # 40 utterances 1.0 .. 4.9 s, 10% apart or more at the short end: buckets widen instead of giving singletons
    durations = [1.0 + 0.1 * i for i in range(40)]
    sampler = DurationBucketSampler(durations, 12.0, shuffle=False)
    batches = list(sampler)
    # a greedy packing in sorted order needs 13 batches; one bucket per 10% step would give 40 singletons
    greedy, size, longest = 1, 0, 0.0
    for d in durations:
        if (size + 1) * max(longest, d) > 12.0:
            greedy, size, longest = greedy + 1, 0, 0.0
        size, longest = size + 1, max(longest, d)
    assert len(batches) <= greedy + 3
    assert all(len(b) * max(durations[i] for i in b) <= 12.0 for b in batches)


def test_sampler_tiny_and_invalid():
    assert list(DurationBucketSampler([], 10.0)) == [] and len(DurationBucketSampler([], 10.0)) == 0
    s = DurationBucketSampler([1.0], 10.0, num_replicas=2, rank=1)
    assert list(s) == [[0]] and len(s) == 1
    with pytest.raises(UserError):
        DurationBucketSampler([1.0], 0)
