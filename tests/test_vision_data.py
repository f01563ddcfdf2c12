"""Vision data modules on synthetic files (IDX, image folders), digits, and real MNIST when it is present."""

import gzip
import io
import logging
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bp_apps.vision.data import (
    DATAMODULES,
    BatchAugment,
    CIFAR10DataModule,
    DigitsImageDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    VisionDataModule,
    load_digits_split,
    load_image,
    read_idx,
    stratified_split,
    to_mode,
)

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IDX_MODULES = [MNISTDataModule, FashionMNISTDataModule]


def write_idx(path: Path, array: np.ndarray) -> None:
    """``array`` as an unsigned-byte IDX file, gzip-compressed when the name ends in .gz (as the originals are)."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def make_idx_root(root: Path, folder: str = "MNIST", suffix: str = ".gz", n_train: int = 50, n_test: int = 20) -> Path:
    """``root/<folder>/raw/`` with random 28×28 images whose pixel (0, 0) is the image's index, labels i % 10."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for part, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)
        write_idx(raw / f"{part}-images-idx3-ubyte{suffix}", images)
        write_idx(raw / f"{part}-labels-idx1-ubyte{suffix}", np.arange(n) % 10)
    return root


def ids(dataset: torch.utils.data.TensorDataset) -> list[int]:
    """The image indices (pixel (0, 0)) held by an IDX data set built by :func:`make_idx_root`."""
    return dataset.tensors[0][:, 0, 0, 0].tolist()


def tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its size, to prove nothing was written."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------ metadata, common API

@pytest.mark.parametrize("cls", [DigitsImageDataModule, MNISTDataModule, FashionMNISTDataModule, CIFAR10DataModule])
def test_metadata_and_eval_transform_need_no_data(cls, tmp_path):
    dm = cls(data_root=str(tmp_path / "nothing-here"))
    assert dm.num_classes == len(dm.class_names) == 10
    channels = dm.input_shape[0]
    assert len(dm.mean) == len(dm.std) == channels and dm.skipped_images == []
    image = Image.new("RGBA", (50, 37), (200, 10, 30, 128))
    out = dm.eval_transform(image)
    assert out.shape == dm.input_shape and out.dtype == torch.float32
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()


def test_datamodule_registry():
    assert set(DATAMODULES) == {"digits", "mnist", "fashion_mnist", "cifar10", "imagefolder"}
    assert all(issubclass(cls, VisionDataModule) for cls in DATAMODULES.values())


@pytest.mark.parametrize("kwargs", [{"val_fraction": 1.0}, {"batch_size": 0}, {"num_workers": -1}])
def test_invalid_common_args(kwargs):
    with pytest.raises(ValueError):
        MNISTDataModule(**kwargs)


# ------------------------------------------------------------------------------------------ IDX data sets

@pytest.mark.parametrize("cls", IDX_MODULES)
def test_idx_module_loads_splits_and_normalizes(cls, tmp_path):
    root = make_idx_root(tmp_path, cls.FOLDER)
    dm = cls(data_root=str(root), batch_size=16, val_fraction=0.2)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (40, 10, 20)
    assert sorted(dm.val_set.tensors[1].tolist()) == list(range(10))  # stratified: one per class
    assert sorted(ids(dm.train_set) + ids(dm.val_set)) == list(range(50))
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (16,) and labels.dtype == torch.int64 and 0 <= labels.min() <= labels.max() < 10
    images, labels = next(iter(dm.val_dataloader()))
    raw, raw_labels = dm.val_set.tensors
    expected = (raw.float() / 255 - dm.mean[0]) / dm.std[0]
    torch.testing.assert_close(images, expected)
    assert torch.equal(labels, raw_labels)
    predicted = torch.cat([x for x, _ in dm.predict_dataloader()])
    tested = torch.cat([x for x, _ in dm.test_dataloader()])
    assert predicted.shape == (20, 1, 28, 28) and torch.equal(predicted, tested)
    pil = Image.fromarray(raw[0, 0].numpy())
    torch.testing.assert_close(dm.eval_transform(pil), expected[0])  # the predict path matches evaluation


def test_idx_split_is_deterministic_by_seed(tmp_path):
    root = str(make_idx_root(tmp_path))
    splits = []
    for seed in (0, 0, 1):
        dm = MNISTDataModule(data_root=root, seed=seed, val_fraction=0.2)
        dm.setup()
        splits.append(ids(dm.val_set))
        assert not set(ids(dm.train_set)) & set(ids(dm.val_set))
    assert splits[0] == splits[1] and splits[0] != splits[2]


def test_idx_augment_changes_training_batches_only(tmp_path):
    root = str(make_idx_root(tmp_path))
    plain, augmented = (MNISTDataModule(data_root=root, batch_size=40, val_fraction=0.2, augment=a) for a in (0, 1))
    for dm in (plain, augmented):
        dm.setup()
    torch.manual_seed(0)
    x_plain, y_plain = next(iter(plain.train_dataloader()))
    x_aug, y_aug = next(iter(augmented.train_dataloader()))
    assert torch.equal(y_plain, y_aug)  # same seeded shuffle
    assert x_aug.shape == x_plain.shape and not torch.allclose(x_aug, x_plain)
    assert torch.equal(next(iter(plain.val_dataloader()))[0], next(iter(augmented.val_dataloader()))[0])


def test_unpacked_idx_files_are_accepted(tmp_path):
    gz, unpacked = (MNISTDataModule(data_root=str(make_idx_root(tmp_path / s, suffix=s))) for s in (".gz", ""))
    for dm in (gz, unpacked):
        dm.setup()
    assert torch.equal(gz.test_set.tensors[0], unpacked.test_set.tensors[0])


def test_present_files_are_read_without_touching_the_network(tmp_path, monkeypatch):
    """Downloading is the default, but only for missing files: with the files present nothing is fetched (even
    with ``download: true``) and nothing is written into the data root."""
    root = make_idx_root(tmp_path / "gz")
    before = tree(root)
    calls = []
    monkeypatch.setattr(MNISTDataModule, "DOWNLOADER", staticmethod(lambda **kwargs: calls.append(kwargs)))
    dm = MNISTDataModule(data_root=str(root))
    assert dm.hparams.download is True
    dm.prepare_data()
    dm.setup()
    next(iter(dm.train_dataloader()))
    MNISTDataModule(data_root=str(root), download=True).prepare_data()
    unpacked = make_idx_root(tmp_path / "unpacked", suffix="")  # unpacked files count as present too
    MNISTDataModule(data_root=str(unpacked)).prepare_data()
    assert calls == [] and tree(root) == before


@pytest.mark.parametrize("cls", [MNISTDataModule, FashionMNISTDataModule])
def test_missing_files_are_downloaded_into_the_data_root(cls, tmp_path, monkeypatch):
    calls = []

    def fetch(root: str, download: bool) -> None:  # torchvision's MNIST(root, download=True), offline
        calls.append((root, download))
        make_idx_root(Path(root), folder=cls.FOLDER)

    monkeypatch.setattr(cls, "DOWNLOADER", staticmethod(fetch))
    dm = cls(data_root=str(tmp_path / "fresh"))
    dm.prepare_data()
    assert calls == [(str(tmp_path / "fresh"), True)]
    dm.setup()
    assert len(dm.test_set) == 20
    cls(data_root=str(tmp_path / "fresh")).prepare_data()
    assert len(calls) == 1, "present now: not fetched again"
    off = cls(data_root=str(tmp_path / "elsewhere"), download=False)
    off.prepare_data()
    assert len(calls) == 1 and not (tmp_path / "elsewhere").exists()
    with pytest.raises(FileNotFoundError, match="download: true"):
        off.setup()


@pytest.mark.parametrize("error", [RuntimeError("Error downloading train-images-idx3-ubyte.gz: <urlopen error "
                                                "[Errno -3] Temporary failure in name resolution>"),
                                   OSError("[Errno 101] Network is unreachable")])
def test_a_failed_download_names_the_folder_and_leaves_nothing_behind(error, tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    (root / "notes.txt").write_text("the user's")

    def fail(root: str, download: bool, partial: str = "MNIST/raw/train-images-idx3-ubyte.gz") -> None:
        (Path(root) / partial).parent.mkdir(parents=True, exist_ok=True)  # offline: a partial file, then the error
        (Path(root) / partial).write_bytes(b"\x1f\x8b partial")
        raise error

    monkeypatch.setattr(MNISTDataModule, "DOWNLOADER", staticmethod(fail))
    with pytest.raises(FileNotFoundError) as info:
        MNISTDataModule(data_root=str(root)).prepare_data()
    message = str(info.value)
    assert str(root / "MNIST" / "raw") in message and "downloading it from its official source failed" in message
    assert str(error).split(":")[0] in message and "--data.data_root" in message
    assert tree(root) == {"notes.txt": 10} and not (root / "MNIST").exists()
    monkeypatch.setattr(CIFAR10DataModule, "DOWNLOADER",
                        staticmethod(lambda **kwargs: fail(**kwargs, partial="cifar-10-python.tar.gz")))
    with pytest.raises(FileNotFoundError, match=r"CIFAR10DataModule: the data is not in .*cifar-10-batches-py"):
        CIFAR10DataModule(data_root=str(tmp_path / "new" / "root")).prepare_data()
    assert not (tmp_path / "new").exists(), "folders the download created are removed again"


def test_the_cli_reports_a_failed_download_as_an_error(tmp_path, monkeypatch, capsys):
    from bp_apps.cli import main

    def offline(root: str, download: bool) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: <urlopen error no network>")

    monkeypatch.setattr(MNISTDataModule, "DOWNLOADER", staticmethod(offline))
    config = Path(__file__).resolve().parents[1] / "configs" / "vision" / "mnist_cnn.yaml"
    assert main(["fit", "--config", str(config), f"--data.data_root={tmp_path / 'data'}",
                 f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.enable_progress_bar=false"]) == 2
    err = capsys.readouterr().err
    assert "bp-apps fit: error: MNISTDataModule: the data is not in" in err and "no network" in err


def test_missing_idx_files_name_them_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        FashionMNISTDataModule(data_root=str(tmp_path)).setup()
    message = str(info.value)
    assert all(name in message for name in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
    assert str(tmp_path / "FashionMNIST" / "raw") in message and "download: true" in message
    root = make_idx_root(tmp_path / "partial")
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        MNISTDataModule(data_root=str(root)).setup()
    assert "train-images" not in str(info.value)


def test_truncated_or_corrupt_idx_files_raise_value_error_naming_them(tmp_path):
    root = make_idx_root(tmp_path)
    raw = root / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte.gz"
    packed = images.read_bytes()
    images.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*truncated"):
        MNISTDataModule(data_root=str(root)).setup()
    unpacked = gzip.decompress(packed)
    images.write_bytes(gzip.compress(unpacked[:-100]))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: truncated: header promises 50×28×28"):
        MNISTDataModule(data_root=str(root)).setup()
    images.write_bytes(gzip.compress(b"PK\x03\x04 not an idx file"))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: not an IDX file"):
        read_idx(images)
    images.write_bytes((raw / "train-labels-idx1-ubyte.gz").read_bytes())  # labels where images belong
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: expected N×28×28 images"):
        MNISTDataModule(data_root=str(root)).setup()


def test_idx_label_count_mismatch(tmp_path):
    root = make_idx_root(tmp_path)
    write_idx(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz", np.zeros(19, np.uint8))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz: expected 20 labels"):
        MNISTDataModule(data_root=str(root)).setup()


@pytest.mark.skipif(not (REAL_DATA / "MNIST" / "raw").is_dir(), reason="real MNIST not present at ../shared/data")
def test_real_mnist_smoke():
    dm = MNISTDataModule(data_root=str(REAL_DATA), batch_size=256)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 60000 and len(dm.val_set) == 6000 and len(dm.test_set) == 10000
    assert torch.bincount(dm.test_set.tensors[1]).tolist()[:2] == [980, 1135]
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (256, 1, 28, 28) and labels.shape == (256,)
    assert abs(images.mean().item()) < 0.15 and abs(images.std().item() - 1) < 0.15


def test_cifar10_missing_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data_batch_1.*cifar-10-batches-py.*download: true"):
        CIFAR10DataModule(data_root=str(tmp_path)).setup()


# ------------------------------------------------------------------------------------------ digits

def test_digits_module():
    dm = DigitsImageDataModule(batch_size=64)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 1347 and len(dm.test_set) == 450
    assert len(dm.val_set) == round(0.1 * 1347)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (64, 1, 8, 8) and labels.dtype == torch.int64
    pixels = load_digits_split().x_train
    assert dm.mean[0] == pytest.approx(pixels.mean().item(), abs=1e-4)
    assert dm.std[0] == pytest.approx(pixels.std(unbiased=False).item(), abs=1e-4)
    augmented = DigitsImageDataModule(augment=True)
    augmented.setup()
    assert next(iter(augmented.train_dataloader()))[0].shape == (128, 1, 8, 8)


# ------------------------------------------------------------------------------------------ splits, augmentation

@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.floats(0.0, 0.9), st.integers(0, 3))
def test_stratified_split_properties(labels, fraction, seed):
    kept, held = stratified_split(labels, fraction, seed)
    assert np.array_equal(np.sort(np.concatenate([kept, held])), np.arange(len(labels)))
    assert len(held) <= round(fraction * len(labels))
    labels = np.asarray(labels)
    for c in np.unique(labels):
        assert (labels[kept] == c).any()  # every class keeps a sample
        assert (labels[held] == c).sum() <= np.ceil(fraction * (labels == c).sum())
    again = stratified_split(labels, fraction, seed)
    assert np.array_equal(kept, again[0]) and np.array_equal(held, again[1])


def test_batch_augment_shifts_and_flips_exactly():
    torch.manual_seed(0)
    images = torch.rand(32, 2, 9, 11)
    torch.testing.assert_close(BatchAugment()(images), images)
    flipped = BatchAugment(hflip=True)(images)
    is_flip = [torch.allclose(f, x.flip(-1), atol=1e-5) for f, x in zip(flipped, images)]
    assert all(f or torch.allclose(o, x, atol=1e-5) for f, o, x in zip(is_flip, flipped, images))
    assert 0 < sum(is_flip) < 32
    shifted = BatchAugment(max_shift=2)(images)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    candidates = [padded[:, :, 2 - dy: 11 - dy, 2 - dx: 13 - dx] for dy in range(-2, 3) for dx in range(-2, 3)]
    for i in range(32):
        assert any(torch.allclose(shifted[i], c[i], atol=1e-5) for c in candidates)
    rotated = BatchAugment(degrees=10, max_shift=1, hflip=True)(images)
    assert rotated.shape == images.shape and rotated.min() >= 0 and rotated.max() <= 1


def test_loader_parts_pickle_for_worker_processes(tmp_path):
    dm = MNISTDataModule(data_root=str(make_idx_root(tmp_path)), augment=True)
    dm.setup()
    collate = pickle.loads(pickle.dumps(dm.train_dataloader().collate_fn))
    assert collate([dm.train_set[0], dm.train_set[1]])[0].shape == (2, 1, 28, 28)


# ------------------------------------------------------------------------------------------ image folders

MODES = [("L", (30, 40), "png"), ("RGB", (64, 48), "jpg"), ("RGBA", (20, 20), "png"), ("P", (50, 50), "png"),
         ("RGB", (17, 90), "jpeg"), ("L", (8, 8), "bmp")]


def make_face_folder(root: Path, classes: tuple[str, ...] = ("alice", "bob", "carol")) -> Path:
    """One folder per class holding six images of mixed sizes, modes and formats, plus files to be ignored."""
    rng = np.random.default_rng(1)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i, (mode, size, ext) in enumerate(MODES):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / name / f"{i}.{ext}")
        (root / name / "notes.txt").write_text("not an image")
        (root / name / "._0.png").write_bytes(b"macOS resource fork, hidden")
    return root


def add_bad_images(folder: Path) -> list[Path]:
    """A truncated JPEG and a text file named .png in ``folder``."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    truncated, fake = folder / "truncated.jpg", folder / "fake.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    fake.write_text("this is text, not a PNG")
    return [truncated, fake]


def test_image_folder_metadata_split_and_batches(tmp_path):
    root = make_face_folder(tmp_path / "faces")
    dm = ImageFolderDataModule(data_root=str(root), image_size=32, batch_size=8)
    assert dm.class_names == ["alice", "bob", "carol"] and dm.num_classes == 3
    assert dm.input_shape == (3, 32, 32) and dm.mean == dm.std == (0.5, 0.5, 0.5)
    dm.setup()
    sizes = (len(dm.train_set), len(dm.val_set), len(dm.test_set))
    assert sizes == (13, 1, 4)  # round(0.2 * 18) test, then round(0.1 * 14) validation
    paths = [p for ds in (dm.train_set, dm.val_set, dm.test_set) for p, _ in ds.samples]
    assert len(set(paths)) == 18 and all(p.suffix != ".txt" and not p.name.startswith(".") for p in paths)
    assert {label for _, label in dm.train_set.samples} == {0, 1, 2}
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1
    again = ImageFolderDataModule(data_root=str(root), image_size=32)
    again.setup()
    assert again.test_set.samples == dm.test_set.samples
    other = ImageFolderDataModule(data_root=str(root), image_size=32, seed=1)
    other.setup()
    assert other.test_set.samples != dm.test_set.samples


def test_image_folder_grayscale_with_augmentation(tmp_path):
    dm = ImageFolderDataModule(data_root=str(make_face_folder(tmp_path)), image_size=24, channels=1, augment=True,
                               batch_size=4)
    dm.setup()
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 1, 24, 24) and dm.input_shape == (1, 24, 24)
    path = dm.test_set.samples[0][0]
    assert dm.eval_transform(load_image(path, 1)).shape == (1, 24, 24)
    assert ImageFolderDataModule(data_root=str(tmp_path)).eval_transform(load_image(path, 3)).shape == (3, 64, 64)


def test_image_folder_with_split_subfolders(tmp_path):
    make_face_folder(tmp_path / "train")
    make_face_folder(tmp_path / "test", classes=("alice", "bob"))
    dm = ImageFolderDataModule(data_root=str(tmp_path), val_fraction=0.2)
    assert dm.class_names == ["alice", "bob", "carol"]
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (14, 4, 12)
    assert all(p.parts[-3] == "test" for p, _ in dm.test_set.samples)
    make_face_folder(tmp_path / "val", classes=("dave",))
    with pytest.raises(ValueError, match="'dave' has no folder in"):
        ImageFolderDataModule(data_root=str(tmp_path)).setup()


def test_bad_images_fail_when_loaded_naming_the_file(tmp_path):
    root = make_face_folder(tmp_path)
    bad = add_bad_images(root / "bob")
    for path in bad:
        with pytest.raises(ValueError, match=path.name):
            load_image(path, 3)
    dm = ImageFolderDataModule(data_root=str(root), test_fraction=0.0, val_fraction=0.0)
    dm.setup()
    index = next(i for i, (p, _) in enumerate(dm.train_set.samples) if p == bad[0])
    with pytest.raises(ValueError, match=r"truncated\.jpg"):
        dm.train_set[index]


def test_bad_images_skipped_when_asked(tmp_path, caplog):
    root = make_face_folder(tmp_path)
    bad = add_bad_images(root / "bob")
    dm = ImageFolderDataModule(data_root=str(root), skip_bad_images=True, image_size=16)
    with caplog.at_level(logging.WARNING, logger="bp_apps.vision.data"):
        dm.setup()
    assert sorted(dm.skipped_images) == sorted(map(str, bad))
    assert "skipped 2 unreadable" in caplog.text
    assert sum(len(ds) for ds in (dm.train_set, dm.val_set, dm.test_set)) == 18
    assert sum(len(y) for _, y in dm.train_dataloader()) == len(dm.train_set)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(data_root=str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{empty.absolute()} has no class sub-folders")):
        ImageFolderDataModule(data_root=str(empty))
    Image.new("RGB", (4, 4)).save(empty / "loose.png")
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataModule(data_root=str(empty))
    (empty / "alice").mkdir()
    dm = ImageFolderDataModule(data_root=str(empty))
    with pytest.raises(ValueError, match="without image files: alice"):
        dm.setup()
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataModule(data_root=str(empty), channels=2)


def test_to_mode_handles_transparency_and_16_bit():
    transparent = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert np.asarray(to_mode(transparent, 3)).min() == 255  # composited onto white
    deep = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert np.asarray(to_mode(deep, 1)).tolist() == [[0, 100, 255]]
    palette = Image.new("P", (3, 3))
    assert to_mode(palette, 1).mode == "L" and to_mode(palette, 3).mode == "RGB"
