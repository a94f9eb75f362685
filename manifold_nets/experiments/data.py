r"""MNIST and Fashion-MNIST from the standard IDX files, held in memory as tensors.

Where the files are looked for, in this order (the first folder that holds all four files
wins; each folder may hold them directly or in a ``<dataset>/`` sub-folder):

1. ``data_dir`` (``--data-dir`` on the command line). When it is given, it is the only
   place looked at, and missing files are downloaded into ``data_dir/<dataset>/``;
2. the folder named by the ``MANIFOLD_NETS_DATA`` environment variable;
3. a local mirror folder named by ``MANIFOLD_NETS_MIRROR`` (read in place, never copied);
4. the cache, ``$MANIFOLD_NETS_CACHE`` or ``~/.cache/manifold-nets``.

If none holds the files, they are downloaded into the first writable place of that list
(``data_dir``, ``MANIFOLD_NETS_DATA``, the cache) from a list of mirrors
(:data:`DEFAULT_MIRRORS`, overridable; ``file://`` URLs and plain paths work too). Each
download goes to a temporary file in the target folder, its *decompressed* content is
checked against the sha256 below, and only then is it moved into place with
:func:`os.replace`; a failed download leaves nothing behind.

Every load checks the sha256 of the decompressed content again (about 0.5 s for the
training images), so a file corrupted after download is never used silently.

Pixels are scaled to ``[0, 1]`` and flattened to 784-vectors; nothing else is done to
them (the paper uses "no input pre-processing").
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .io import fsync_dir

__all__ = [
    "DATASETS",
    "DEFAULT_MIRRORS",
    "FILES",
    "DataError",
    "Dataset",
    "download_file",
    "find_dataset",
    "load_dataset",
    "read_idx",
]

#: The four IDX files of a data set, in the order train images, train labels, test images,
#: test labels.
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

#: sha256 of the *decompressed* IDX files.
DATASETS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": (
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
        ),
        "train-labels-idx1-ubyte": (
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
        ),
        "t10k-images-idx3-ubyte": (
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
        ),
        "t10k-labels-idx1-ubyte": (
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
        ),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": (
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
        ),
        "train-labels-idx1-ubyte": (
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
        ),
        "t10k-images-idx3-ubyte": (
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
        ),
        "t10k-labels-idx1-ubyte": (
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
        ),
    },
}

#: Public mirrors, tried in order; each is a base URL under which ``<file>.gz`` lives.
DEFAULT_MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
}

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


class DataError(RuntimeError):
    """A data file is missing, corrupted or could not be downloaded (the message says how
    to fix it).

    A :class:`RuntimeError`, raised by :func:`download_file`, :func:`find_dataset`,
    :func:`read_idx` and :func:`load_dataset` (and by the CamVid loaders).

    Examples
    --------
    >>> import tempfile
    >>> from manifold_nets.experiments.data import DataError, find_dataset
    >>> try:
    ...     find_dataset("mnist", tempfile.mkdtemp(), download=False)
    ... except DataError as err:
    ...     print("Fix:" in str(err))
    True
    """


@dataclass(frozen=True)
class Dataset:
    """A data set in memory: images as ``float32`` rows in ``[0, 1]``, labels as ``int64``.

    Attributes
    ----------
    name : str
        ``"mnist"`` or ``"fashion-mnist"``.
    x_train, y_train : torch.Tensor
        ``(60000, 784)`` images and ``(60000,)`` labels.
    x_test, y_test : torch.Tensor
        ``(10000, 784)`` images and ``(10000,)`` labels.
    source : str
        The folder the files were read from.

    Parameters
    ----------
    name, x_train, y_train, x_test, y_test, source
        The attributes of the same names (``source`` defaults to ``""``).

    Examples
    --------
    :func:`load_dataset` builds it; any tensors of the right kinds do:

    >>> import torch
    >>> from manifold_nets.experiments.data import Dataset
    >>> ds = Dataset("mnist", torch.rand(6, 784), torch.randint(0, 10, (6,)),
    ...              torch.rand(2, 784), torch.randint(0, 10, (2,)))
    >>> ds.in_features, ds.num_classes, ds.source
    (784, 10, '')
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str = ""

    @classmethod
    def synthetic(cls, n_train: int = 60, n_test: int = 10, seed: int = 0,
                  dtype: torch.dtype | None = None) -> Dataset:
        """MNIST-shaped random data: uniform pixels, labels from a random linear teacher
        (so that a network can learn them), for examples and smoke tests.

        Parameters
        ----------
        n_train, n_test : int
            Training and test images.
        seed : int
            Seeds the teacher and the pixels.
        dtype : torch.dtype, optional
            The images' dtype (default: torch's default dtype).

        Returns
        -------
        Dataset
            Named ``"mnist"``, with 784 features and 10 classes, ``source`` ``"synthetic"``.

        Examples
        --------
        >>> from manifold_nets.experiments.data import Dataset
        >>> data = Dataset.synthetic(60, 10)
        >>> tuple(data.x_train.shape), tuple(data.y_test.shape), data.source
        ((60, 784), (10,), 'synthetic')
        """
        g = torch.Generator().manual_seed(seed)
        dtype = dtype or torch.get_default_dtype()
        teacher = torch.randn(784, 10, generator=g, dtype=dtype)
        x = torch.rand(n_train + n_test, 784, generator=g, dtype=dtype)
        y = ((x - 0.5) @ teacher).argmax(1)
        return cls("mnist", x[:n_train], y[:n_train], x[n_train:], y[n_train:], "synthetic")

    @property
    def num_classes(self) -> int:
        """The number of classes: 10 for both data sets.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.experiments.data import Dataset
        >>> x, y = torch.rand(2, 784), torch.zeros(2, dtype=torch.long)
        >>> Dataset("fashion-mnist", x, y, x, y).num_classes
        10
        """
        return 10

    @property
    def in_features(self) -> int:
        """The length of an image row (784 for 28 x 28 pixels).

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.experiments.data import Dataset
        >>> x, y = torch.rand(2, 784), torch.zeros(2, dtype=torch.long)
        >>> Dataset("mnist", x, y, x, y).in_features
        784
        """
        return int(self.x_train.shape[1])


def _check_name(name: str) -> dict[str, str]:
    if name not in DATASETS:
        raise ValueError(f"Unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def cache_root() -> Path:
    """Where downloaded datasets are kept: ``$MANIFOLD_NETS_CACHE``, else
    ``~/.cache/manifold-nets``.

    Returns
    -------
    pathlib.Path
        The folder (it may not exist yet).
    """
    env = os.environ.get("MANIFOLD_NETS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "manifold-nets"


def _file_in(folder: Path, fname: str) -> Path | None:
    """The raw or gzipped copy of ``fname`` in ``folder``, if any (raw first)."""
    for candidate in (folder / fname, folder / (fname + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _dataset_folder(root: Path, name: str) -> Path:
    """``root/<name>`` if it exists, else ``root`` (files may sit directly in it)."""
    sub = root / name
    return sub if sub.is_dir() else root


def _complete(folder: Path) -> bool:
    return all(_file_in(folder, f) is not None for f in FILES)


def _local_mirror() -> Path | None:
    value = os.environ.get("MANIFOLD_NETS_MIRROR")
    if not value:
        return None
    parsed = urllib.parse.urlparse(value)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" and Path(value).is_dir():
        return Path(value)
    return None


def data_roots(data_dir: str | os.PathLike | None) -> list[tuple[str, Path]]:
    """The folders searched for a dataset, in order, each with where it comes from.

    Parameters
    ----------
    data_dir : path or None
        The user's folder: then the only one.

    Returns
    -------
    list of (str, pathlib.Path)
        Otherwise ``$MANIFOLD_NETS_DATA``, the local mirror (``$MANIFOLD_NETS_MIRROR``)
        where set, then :func:`cache_root`.
    """
    if data_dir is not None:
        return [("data_dir", Path(data_dir))]
    roots = []
    if os.environ.get("MANIFOLD_NETS_DATA"):
        roots.append(("MANIFOLD_NETS_DATA", Path(os.environ["MANIFOLD_NETS_DATA"])))
    mirror = _local_mirror()
    if mirror is not None:
        roots.append(("MANIFOLD_NETS_MIRROR", mirror))
    roots.append(("cache", cache_root()))
    return roots


def _mirror_urls(name: str, mirrors: Sequence[str] | None) -> list[str]:
    """Base URLs (ending in ``/``) to download ``name`` from.

    An explicit list is used as given, with ``{dataset}`` replaced by ``name``; plain paths
    become ``file://`` URLs. Without one: ``MANIFOLD_NETS_MIRROR`` (a base holding
    ``<dataset>/`` sub-folders) if set, then :data:`DEFAULT_MIRRORS`.
    """
    if mirrors is None:
        bases = []
        env = os.environ.get("MANIFOLD_NETS_MIRROR")
        if env:
            bases.append(env.rstrip("/") + "/{dataset}/")
        bases.extend(DEFAULT_MIRRORS[name])
    else:
        bases = list(mirrors)
    urls = []
    for base in bases:
        base = base.replace("{dataset}", name)
        if urllib.parse.urlparse(base).scheme not in ("http", "https", "file", "ftp"):
            base = Path(base).resolve().as_uri()
        urls.append(base.rstrip("/") + "/")
    return urls


def _sha256_of(path: Path) -> tuple[str, int]:
    """sha256 and size of the decompressed content of ``path`` (gzip or raw)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as raw:
        magic = raw.read(2)
    opener = gzip.open if magic == _GZIP_MAGIC else open
    with opener(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def download_file(
    name: str,
    fname: str,
    target: str | os.PathLike,
    *,
    mirrors: Sequence[str] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download one IDX file of data set ``name`` into the folder ``target``.

    Each mirror is tried in turn: the file ``<base>/<fname>.gz`` is streamed to a temporary
    file in ``target``, the sha256 of its decompressed content is checked, and the file is
    moved into place atomically. Nothing is left behind when every mirror fails.

    Parameters
    ----------
    name : str
        ``"mnist"`` or ``"fashion-mnist"``.
    fname : str
        One of :data:`FILES`.
    target : path
        The folder to write into (created if needed).
    mirrors : sequence of str, optional
        Base URLs; see :func:`load_dataset`.
    timeout : float
        Seconds to wait on each connection.

    Returns
    -------
    pathlib.Path
        The verified file (``<fname>.gz`` or ``<fname>``, after its content).

    Raises
    ------
    DataError
        If no mirror gave a file with the right checksum; the message lists what each
        mirror did and how to fix it.
    ValueError
        If ``name`` is not a known data set.
    KeyError
        If ``fname`` is not one of :data:`FILES`.

    Examples
    --------
    A mirror (here an empty local folder) without the file: nothing is left behind.

    >>> import os
    >>> import tempfile
    >>> from manifold_nets.experiments.data import DataError, download_file
    >>> root = tempfile.mkdtemp()
    >>> try:
    ...     download_file("mnist", "t10k-labels-idx1-ubyte", os.path.join(root, "mnist"),
    ...                   mirrors=[os.path.join(root, "empty-mirror")])
    ... except DataError as err:
    ...     print(str(err).splitlines()[0].startswith("Could not download mnist file"))
    True
    >>> os.listdir(os.path.join(root, "mnist"))
    []
    """
    expected = _check_name(name)[fname]
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    failures = []
    for base in _mirror_urls(name, mirrors):
        url = base + fname + ".gz"
        fd, tmp_name = tempfile.mkstemp(prefix=f".{fname}.", suffix=".part", dir=target)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                request = urllib.request.Request(url, headers={"User-Agent": "manifold-nets"})
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            try:
                digest, _ = _sha256_of(tmp)
            except (OSError, EOFError) as err:
                failures.append(f"{url}: unreadable or truncated ({err})")
                continue
            if digest != expected:
                failures.append(f"{url}: sha256 of the content is {digest}, expected {expected}")
                continue
            with open(tmp, "rb") as fh:
                gz = fh.read(2) == _GZIP_MAGIC
            final = target / (fname + ".gz" if gz else fname)
            os.replace(tmp, final)
            fsync_dir(target)
            return final
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            failures.append(f"{url}: {reason}")
        finally:
            if tmp.exists():
                tmp.unlink()
    raise DataError(
        f"Could not download {name} file {fname!r} into {target}:\n  "
        + "\n  ".join(failures)
        + "\nFix: check the network, pass other mirrors (mirrors=[...], or "
        "MANIFOLD_NETS_MIRROR=<folder or URL holding <dataset>/<file>.gz>), or put the four "
        f"IDX files of {name} in a folder and pass it as --data-dir."
    )


def find_dataset(
    name: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    *,
    mirrors: Sequence[str] | None = None,
    download: bool = True,
) -> Path:
    """The folder holding the four IDX files of ``name``, downloading them if needed.

    See the module docstring for the search order. Returns the folder; does not verify
    checksums (:func:`load_dataset` does, on every load).

    Parameters
    ----------
    name : {"mnist", "fashion-mnist"}
        The data set.
    data_dir : path, optional
        The only folder to look in (directly or in ``<name>/``); missing files are
        downloaded into ``data_dir/<name>/``.
    mirrors : sequence of str, optional
        Base URLs to download from (see :func:`load_dataset`).
    download : bool
        Whether to download missing files.

    Returns
    -------
    pathlib.Path
        The first folder holding all four files (raw or gzipped), or the folder they were
        downloaded into.

    Raises
    ------
    ValueError
        If ``name`` is not a known data set.
    DataError
        If the files are nowhere and ``download`` is off, or a download fails.

    Examples
    --------
    A folder in the expected layout (empty files: the checksums are not read here):

    >>> import tempfile
    >>> from pathlib import Path
    >>> from manifold_nets.experiments.data import FILES, find_dataset
    >>> root = Path(tempfile.mkdtemp())
    >>> (root / "mnist").mkdir()
    >>> for fname in FILES:
    ...     _ = (root / "mnist" / (fname + ".gz")).write_bytes(b"")
    >>> find_dataset("mnist", root, download=False) == root / "mnist"
    True
    """
    _check_name(name)
    roots = data_roots(data_dir)
    for _, root in roots:
        folder = _dataset_folder(root, name)
        if _complete(folder):
            return folder
    writable = [root for label, root in roots if label != "MANIFOLD_NETS_MIRROR"]
    target = writable[0] / name
    if not download:
        looked = ", ".join(f"{label}={root}" for label, root in roots)
        raise DataError(
            f"The {name} IDX files {list(FILES)} are not in any of: {looked}. Fix: pass "
            f"--data-dir <folder holding them>, or allow downloading."
        )
    for fname in FILES:
        if _file_in(target, fname) is None:
            download_file(name, fname, target, mirrors=mirrors)
    return target


def read_idx(path: str | os.PathLike, expected_sha256: str | None = None) -> np.ndarray:
    """Read an IDX file (gzip or raw) into a ``uint8`` array, checking its sha256.

    Parameters
    ----------
    path : path
        The file, gzip-compressed or raw (told apart by its first two bytes).
    expected_sha256 : str, optional
        The sha256 of the decompressed content; ``None`` skips the check.

    Returns
    -------
    numpy.ndarray
        ``uint8``, of the shape the IDX header gives (read-only: a view of the file's
        bytes).

    Raises
    ------
    DataError
        On a wrong checksum, a truncated file or a malformed header, naming the file.

    Examples
    --------
    A tiny IDX file: magic ``0 0 8 ndim``, the shape as big-endian 32-bit integers, then
    the bytes.

    >>> import gzip
    >>> import hashlib
    >>> import os
    >>> import tempfile
    >>> import numpy as np
    >>> from manifold_nets.experiments.data import DataError, read_idx
    >>> array = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
    >>> content = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (3, 2, 2))
    >>> content += array.tobytes()
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny-idx3-ubyte.gz")
    >>> with gzip.open(path, "wb") as fh:
    ...     _ = fh.write(content)
    >>> out = read_idx(path, hashlib.sha256(content).hexdigest())
    >>> out.shape, out.dtype.name, out[2].tolist()
    ((3, 2, 2), 'uint8', [[8, 9], [10, 11]])
    >>> try:
    ...     read_idx(path, "0" * 64)
    ... except DataError as err:
    ...     print("is corrupted" in str(err))
    True
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            gz = raw.read(2) == _GZIP_MAGIC
        with (gzip.open if gz else open)(path, "rb") as fh:
            content = fh.read()
    except (OSError, EOFError) as err:
        raise DataError(
            f"{path} could not be read ({err}); it is probably truncated. Fix: delete it and "
            "run again to download a fresh copy, or point --data-dir at a good copy."
        ) from err
    if expected_sha256 is not None:
        digest = hashlib.sha256(content).hexdigest()
        if digest != expected_sha256:
            raise DataError(
                f"{path} is corrupted: the sha256 of its decompressed content is {digest}, "
                f"expected {expected_sha256}. Fix: delete it and run again to download a "
                "fresh copy, or point --data-dir at a good copy."
            )
    if len(content) < 4 or content[0] != 0 or content[1] != 0 or content[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number).")
    ndim = content[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(content) != header + int(np.prod(shape)):
        raise DataError(f"{path}: IDX header says shape {shape}, which does not match its size.")
    return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(shape)


def load_dataset(
    name: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    *,
    mirrors: Sequence[str] | None = None,
    download: bool = True,
) -> Dataset:
    """Load MNIST or Fashion-MNIST into memory, downloading it if needed.

    Parameters
    ----------
    name : {"mnist", "fashion-mnist"}
        The data set.
    data_dir : path, optional
        A folder holding the IDX files (directly or in ``<name>/``). Missing files are
        downloaded into ``data_dir/<name>/``.
    mirrors : sequence of str, optional
        Base URLs to download from, replacing the default list; ``{dataset}`` in a URL is
        replaced by ``name``, and plain paths are taken as local folders.
    download : bool
        Whether to download missing files.

    Returns
    -------
    Dataset
        Images as ``float32`` rows scaled to ``[0, 1]``, labels as ``int64``.

    Raises
    ------
    ValueError
        If ``name`` is not a known data set.
    DataError
        If the files are missing (and not downloaded) or fail their checksums.

    Examples
    --------
    Loading the real files needs them (or a network), which a docs build does not have,
    so these two lines are not run:

    >>> ds = load_dataset("mnist")  # doctest: +SKIP
    >>> ds.x_train.shape, ds.y_test.shape  # doctest: +SKIP
    (torch.Size([60000, 784]), torch.Size([10000]))

    Every file is checked against :data:`DATASETS`, so a folder of look-alike files is
    refused, naming the file:

    >>> import tempfile
    >>> from pathlib import Path
    >>> from manifold_nets.experiments.data import DataError, FILES, load_dataset
    >>> root = Path(tempfile.mkdtemp())
    >>> for fname in FILES:
    ...     _ = (root / fname).write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 1, 7]))
    >>> try:
    ...     load_dataset("mnist", root, download=False)
    ... except DataError as err:
    ...     print(str(err).startswith(str(root / FILES[0])), "is corrupted" in str(err))
    True True
    """
    sums = _check_name(name)
    folder = find_dataset(name, data_dir, mirrors=mirrors, download=download)
    arrays = {}
    for fname in FILES:
        path = _file_in(folder, fname)
        assert path is not None
        arrays[fname] = read_idx(path, sums[fname])

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.reshape(a.shape[0], -1).astype(np.float32) / 255.0)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Dataset(
        name=name,
        x_train=images(arrays[FILES[0]]),
        y_train=labels(arrays[FILES[1]]),
        x_test=images(arrays[FILES[2]]),
        y_test=labels(arrays[FILES[3]]),
        source=str(folder),
    )
