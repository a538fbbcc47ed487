"""The sharded feature store: few files, appendable, exact; every rank of a run extracts its share."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_colour_folder

from transferkit import Preprocessing, TransferModel, load_backbone
from transferkit import feature_store
from transferkit.data import EpochSeededSampler, scan_class_folder
from transferkit.feature_store import FeatureStore
from transferkit.features import extract_features, file_key, store_features

SMALL = Preprocessing(image_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.5,) * 3)


def _model() -> TransferModel:
    torch.manual_seed(0)
    return TransferModel(load_backbone("resnet18", weights="none", preprocessing=SMALL), ["blue", "red"]).eval()


@pytest.fixture
def images(tmp_path: Path) -> list[tuple[str, int]]:
    make_colour_folder(tmp_path / "imgs", 6)
    return scan_class_folder(tmp_path / "imgs")[1]


def _shard_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file() and p.name != "spec.json")


def _key(seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(feature_store.KEY_BYTES)


def test_rows_written_by_a_writer_are_found_by_key_and_read_back(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "s")
    rows = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    with store.writer() as writer:
        for i in range(5):
            writer.add(_key(i), rows[i])
    where = store.locate([_key(3), _key(99), _key(0)])
    assert where[1].tolist() == [-1, -1] and (where[[0, 2]] >= 0).all()
    assert np.array_equal(store.read(where[[0, 2]]), rows[[3, 0]])
    assert np.array_equal(FeatureStore(tmp_path / "s").read(where[[0, 2]]), rows[[3, 0]])  # a new reader too


def test_a_writer_splits_its_rows_into_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feature_store, "SHARD_ROWS", 4)
    store = FeatureStore(tmp_path)
    with store.writer() as writer:
        for i in range(10):
            writer.add(_key(i), np.full(3, i, np.float32))
    assert len(writer.written) == 3 and len(store) == 10  # 4 + 4 + 2 rows
    assert store.read(store.locate([_key(i) for i in range(10)]))[:, 0].tolist() == list(range(10))


# A process whose soft limit of open files is below the store's shard count (each shard's memory map
# holds a descriptor): every shard must still be read. Prints the rows found and the soft limit after.
FEW_OPEN_FILES = """
import resource, sys, warnings
from transferkit.feature_store import FeatureStore
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
warnings.simplefilter("error")  # an ignored shard ("Too many open files") fails the run
store = FeatureStore(sys.argv[1])
print(len(store), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def test_a_store_of_more_shards_than_the_open_file_limit_is_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feature_store, "SHARD_ROWS", 1)
    with FeatureStore(tmp_path / "s").writer() as writer:
        for i in range(100):
            writer.add(_key(i), np.full(3, i, np.float32))
    script = tmp_path / "few_files.py"
    script.write_text(FEW_OPEN_FILES)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "s")], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows, soft = map(int, proc.stdout.split())
    assert rows == 100 and soft > 100


def test_an_unfinished_or_damaged_shard_is_not_read(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    with store.writer() as writer:
        writer.add(_key(1), np.ones(4, np.float32))
    shards = store.shard_dir
    # A writer that died between its rows and its keys: rows without keys are no shard yet.
    np.save(shards / "other-00000.rows.npy", np.zeros((1, 4), np.float32))
    # Keys that disagree with their rows: skipped with a warning, not trusted.
    np.save(shards / "bad-00000.rows.npy", np.zeros((2, 4), np.float32))
    (shards / "bad-00000.keys").write_bytes(_key(2))
    with pytest.warns(UserWarning, match="ignoring shard bad-00000"):
        reopened = FeatureStore(tmp_path)
    assert len(reopened) == 1 and reopened.locate([_key(2)]).tolist() == [[-1, -1]]


def test_extraction_through_the_store_is_bit_identical_to_computing_in_memory(images: list, tmp_path: Path) -> None:
    model = _model()
    plain = extract_features(model, images, use_cache=False, num_workers=0)
    first = extract_features(model, images, cache_dir=tmp_path / "c", num_workers=0)
    again = extract_features(model, images, cache_dir=tmp_path / "c", num_workers=0)
    assert (first.hits, first.misses, again.hits, again.misses) == (0, 12, 12, 0)
    assert torch.equal(plain.features, first.features) and torch.equal(plain.features, again.features)
    assert first.paths == again.paths == [p for p, _ in images] and torch.equal(first.labels, plain.labels)
    assert len(_shard_files(tmp_path / "c")) == 2  # 12 vectors: one shard (rows + keys), not 12 files


def test_new_images_extend_the_store_without_rewriting_it(images: list, tmp_path: Path) -> None:
    model = _model()
    extract_features(model, images[:5], cache_dir=tmp_path / "c", num_workers=0)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in _shard_files(tmp_path / "c")}
    grown = extract_features(model, images, cache_dir=tmp_path / "c", num_workers=0)
    after = _shard_files(tmp_path / "c")
    assert (grown.hits, grown.misses) == (5, 7) and len(after) == 4
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == before[p] for p in before)  # untouched
    assert torch.equal(grown.features, extract_features(model, images, use_cache=False, num_workers=0).features)


def test_views_and_undecodable_files_keep_their_places(images: list, tmp_path: Path) -> None:
    model = _model()
    broken = tmp_path / "imgs" / "red" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with_bad = [images[0], (str(broken), 1), images[1]]
    with pytest.warns(UserWarning, match="broken.jpg"):
        stored = extract_features(model, with_bad, augment="light", views=2, cache_dir=tmp_path / "c", num_workers=0)
    with pytest.warns(UserWarning, match="broken.jpg"):
        plain = extract_features(model, with_bad, augment="light", views=2, use_cache=False, num_workers=0)
    assert stored.skipped == plain.skipped == [str(broken)] and stored.paths == [images[0][0]] * 2 + [images[1][0]] * 2
    assert torch.equal(stored.features, plain.features)


def test_the_stored_rows_dataset_gives_the_batches_of_the_matrix(images: list, tmp_path: Path) -> None:
    stored = store_features(_model(), images, cache_dir=tmp_path, num_workers=0)
    matrix = stored.to_feature_set().features
    loader = torch.utils.data.DataLoader(stored.dataset(), batch_size=4, sampler=EpochSeededSampler(12, 3, with_aug_seeds=False))
    order = list(EpochSeededSampler(12, 3, with_aug_seeds=False))
    batches = list(loader)  # one epoch (a second pass would be the next epoch's order)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert torch.equal(x, matrix[order]) and torch.equal(y, stored.labels[order])


# A user's training script; Lightning starts rank 1 by running it again.
DDP_SCRIPT = """
import sys
import transferkit
data, out, cache = sys.argv[1:4]
transferkit.train(data, model="resnet18", weights="none", image_size=32, strategy="feature-extract", epochs=1,
                  batch_size=4, accelerator="cpu", devices=2, dist="ddp", num_workers=0, out=out, quiet=True,
                  cache_dir=cache)
"""


@pytest.mark.slow
def test_every_rank_extracts_its_own_share_and_the_result_equals_one_process(tiny_dataset: Path, tmp_path: Path) -> None:
    from transferkit import load_checkpoint
    from transferkit.data import discover

    out, cache, script = tmp_path / "ddp", tmp_path / "cache", tmp_path / "train_ddp.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tiny_dataset), str(out), str(cache)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["feature_cache"]["computed_by_rank"] == [14, 14]
    (root,) = [p.parent for p in cache.glob("features/*/spec.json")]
    store = FeatureStore(root)
    assert not list(cache.rglob("*.tmp"))
    # Which rank wrote which rows: disjoint, complete, each vector written once.
    keys_by_rank: dict[str, set[bytes]] = {"rank0": set(), "rank1": set()}
    for name in store.names:
        rank = next(r for r in keys_by_rank if f"-{r}-" in name)
        raw = (store.shard_dir / f"{name}.keys").read_bytes()
        keys_by_rank[rank] |= {raw[i : i + 20] for i in range(0, len(raw), 20)}
    splits = discover(tiny_dataset)
    samples = splits.train + splits.val
    expected = {bytes.fromhex(file_key(p, 0)) for p, _ in samples}
    assert keys_by_rank["rank0"].isdisjoint(keys_by_rank["rank1"]) and len(store) == len(expected) == 28
    assert keys_by_rank["rank0"] | keys_by_rank["rank1"] == expected
    assert min(len(k) for k in keys_by_rank.values()) == 14
    # The same vectors as one process computing them all, with the run's own (frozen) backbone.
    model = load_checkpoint(out)
    precision = metrics["feature_cache"]["precision"]
    alone = extract_features(model, samples, cache_dir=tmp_path / "alone", num_workers=0, precision=precision)
    shared = store.read(store.locate([bytes.fromhex(file_key(p, 0)) for p, _ in samples]))
    assert torch.equal(torch.from_numpy(shared), alone.features)
