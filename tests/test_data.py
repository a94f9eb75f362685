"""The data loader: the local mirror, real downloads from a local HTTP server, checksums."""

from __future__ import annotations

import gzip
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from manifold_nets.experiments import data
from manifold_nets.experiments.data import (
    DataError,
    download_file,
    find_dataset,
    load_dataset,
    read_idx,
)

from .conftest import SHARED

pytestmark = pytest.mark.skipif(
    not (SHARED / "mnist").is_dir(), reason=f"no local MNIST mirror at {SHARED}"
)
LABELS = "t10k-labels-idx1-ubyte"


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No public mirrors (nothing leaves 127.0.0.1), an empty cache, no data env vars."""
    monkeypatch.setattr(data, "DEFAULT_MIRRORS", {k: () for k in data.DEFAULT_MIRRORS})
    monkeypatch.setenv("MANIFOLD_NETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MANIFOLD_NETS_DATA", raising=False)
    monkeypatch.delenv("MANIFOLD_NETS_MIRROR", raising=False)


@pytest.fixture
def corrupted(tmp_path) -> Path:
    """A mirror whose test labels have one label changed (valid gzip, wrong content) and
    whose training labels are a truncated gzip."""
    root = tmp_path / "bad-mirror" / "mnist"
    root.mkdir(parents=True)
    content = bytearray(gzip.decompress((SHARED / "mnist" / (LABELS + ".gz")).read_bytes()))
    content[100] = (content[100] + 1) % 10
    (root / (LABELS + ".gz")).write_bytes(gzip.compress(bytes(content)))
    good = (SHARED / "mnist" / "train-labels-idx1-ubyte.gz").read_bytes()
    (root / "train-labels-idx1-ubyte.gz").write_bytes(good[: len(good) // 2])
    return root.parent


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_local_mirror_is_read_in_place(monkeypatch):
    monkeypatch.setenv("MANIFOLD_NETS_MIRROR", str(SHARED))
    ds = load_dataset("mnist")
    assert Path(ds.source) == SHARED / "mnist"
    assert ds.x_train.shape == (60000, 784) and ds.x_train.dtype == torch.float32
    assert ds.x_test.shape == (10000, 784) and ds.y_test.shape == (10000,)
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) == 1.0
    assert ds.y_train[:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first MNIST labels
    assert sorted(ds.y_test.unique().tolist()) == list(range(10))


def test_data_dir_with_dataset_subfolders():
    assert find_dataset("fashion-mnist", SHARED) == SHARED / "fashion-mnist"
    assert find_dataset("mnist", SHARED / "mnist") == SHARED / "mnist"


def test_environment_data_folder_comes_before_the_mirror(monkeypatch, tmp_path):
    own = tmp_path / "own" / "mnist"
    own.mkdir(parents=True)
    for f in data.FILES:
        os.symlink(SHARED / "mnist" / (f + ".gz"), own / (f + ".gz"))
    monkeypatch.setenv("MANIFOLD_NETS_DATA", str(own.parent))
    monkeypatch.setenv("MANIFOLD_NETS_MIRROR", str(SHARED))
    assert find_dataset("mnist") == own


def test_download_from_local_http_server(serve, tmp_path):
    url = serve(SHARED)
    target = tmp_path / "data"
    ds = load_dataset("mnist", target, mirrors=[url + "{dataset}/"])
    assert Path(ds.source) == target / "mnist"
    assert _leftovers(target / "mnist") == sorted(f + ".gz" for f in data.FILES)
    assert ds.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    # a second load finds the files and needs no mirror
    assert load_dataset("mnist", target, mirrors=[]).source == ds.source


def test_download_goes_to_the_cache_by_default(serve, monkeypatch, tmp_path):
    url = serve(SHARED / "mnist")
    monkeypatch.setattr(data, "DEFAULT_MIRRORS", {"mnist": (url,), "fashion-mnist": ()})
    path = download_file("mnist", LABELS, tmp_path / "cache" / "mnist")
    assert path == tmp_path / "cache" / "mnist" / (LABELS + ".gz")


def test_file_url_and_plain_path_mirrors(tmp_path):
    for i, mirror in enumerate([(SHARED / "mnist").as_uri(), str(SHARED / "{dataset}")]):
        path = download_file("mnist", LABELS, tmp_path / str(i), mirrors=[mirror])
        assert read_idx(path, data.DATASETS["mnist"][LABELS]).shape == (10000,)


def test_wrong_checksum_names_the_file_and_leaves_nothing(serve, corrupted, tmp_path):
    url = serve(corrupted)
    target = tmp_path / "t"
    with pytest.raises(DataError, match=rf"(?s){LABELS}.*sha256 of the content is .*Fix:"):
        download_file("mnist", LABELS, target, mirrors=[url + "mnist/"])
    assert _leftovers(target) == []


def test_truncated_download_is_refused(serve, corrupted, tmp_path):
    url = serve(corrupted)
    with pytest.raises(DataError, match=r"(?s)train-labels-idx1-ubyte.*truncated"):
        download_file("mnist", "train-labels-idx1-ubyte", tmp_path / "t", mirrors=[url + "mnist/"])
    assert _leftovers(tmp_path / "t") == []


def test_a_bad_mirror_falls_through_to_a_good_one(serve, corrupted, tmp_path):
    bad, good = serve(corrupted), serve(SHARED)
    mirrors = [bad + "{dataset}", good + "{dataset}"]
    path = download_file("mnist", LABELS, tmp_path / "t", mirrors=mirrors)
    assert _leftovers(tmp_path / "t") == [path.name]


def test_unreachable_mirror(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match=rf"(?s)Could not download mnist file '{LABELS}'.*Fix:"):
        download_file("mnist", LABELS, tmp_path, mirrors=[f"http://127.0.0.1:{port}/"], timeout=5)
    assert _leftovers(tmp_path) == []


def test_corrupted_local_file_is_refused_on_load(tmp_path):
    folder = tmp_path / "mnist"
    shutil.copytree(SHARED / "mnist", folder)
    raw = gzip.decompress((folder / (LABELS + ".gz")).read_bytes())
    (folder / (LABELS + ".gz")).unlink()
    (folder / LABELS).write_bytes(raw[:-1] + b"\x07")  # raw IDX files are read too
    with pytest.raises(DataError, match=rf"{LABELS} is corrupted.*delete it"):
        load_dataset("mnist", tmp_path)


def test_missing_files_without_download(tmp_path):
    with pytest.raises(DataError, match="not in any of"):
        find_dataset("mnist", tmp_path, download=False)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="Unknown data set 'cifar'"):
        load_dataset("cifar")
