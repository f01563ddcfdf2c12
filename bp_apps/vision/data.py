"""Image classification data for Lightning: scikit-learn digits, MNIST, Fashion-MNIST, CIFAR-10 and image folders.

Every module exposes its metadata right after ``__init__`` (``num_classes``, ``class_names``, ``input_shape``,
``mean``, ``std`` and ``eval_transform``, which turns any PIL image into the tensor evaluation sees; ``bp-apps``
links the first three to the model), keeps class names, shape, mean and std in its checkpoint state (for
``predict-image``), refuses in ``setup`` a model built for another class count or shape, and its loaders yield
``(float32 images (B, C, H, W), int64 labels (B,))``. Validation is split off the training data by ``seed``,
stratified by class. Digits, MNIST, Fashion-MNIST and CIFAR-10 stay in memory as pixel tensors: their loaders
normalize whole batches and, with ``augment``, draw a random rotation/shift/flip per sample in one vectorized
``grid_sample`` (no PIL round trip per image). Image folders are decoded per file with PIL and torchvision's v2
transforms. Without ``data_root``, the data root is ``$BP_APPS_DATA``, else ``./data`` (looked up when the data is
read, not at import). MNIST, Fashion-MNIST and CIFAR-10 are fetched from their official sources (torchvision, MD5
checked) into the data root when their files are missing there (``download``, on by default); when the files are
present, or with ``download: false``, nothing touches the network and nothing is written into the data root.

Bring your own data: :class:`DatasetDataModule` turns any map-style data sets of ``(image, label)`` items (a
torchvision data set, your own) into such a module. A ``LightningDataModule`` of your own that yields
``(images, labels)`` works too: :func:`user_data_check` (which ``bp-apps`` adds to the image classifier's runs)
checks its first batches against the model and keeps what ``predict-image`` needs in the checkpoint, read from the
module's ``class_names``, ``input_shape``, ``mean`` and ``std`` attributes or hyperparameters when it has them
(else: class indices as names, the model's input shape, no normalisation).
"""

from __future__ import annotations

import gzip
import logging
import math
import tarfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate
from torchvision.transforms import v2

from bp_apps.core.datalink import PreprocessingDataModule, UserDataModuleCheck, data_value
from bp_apps.core.io import data_root_hint, resolve_data_root
from bp_apps.core.resume import resumable_loader
from bp_apps.core.samplers import evaluation_loader

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".bmp", ".gif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".ppm", ".tif", ".tiff",
                              ".webp"})
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR10_FILES = ("batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch")
IDX_UNSIGNED_BYTE = 0x08


# ----------------------------------------------------------------------------------------------- images and files

def _mode(channels: int) -> str:
    """The PIL mode for a channel count: "L" (8-bit gray) for 1, "RGB" for 3."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return "L" if channels == 1 else "RGB"


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """``image`` as 8-bit gray (1 channel) or RGB (3), so every file mode reaches the model the same way.

    Transparent pixels are composited onto white and 16-bit gray (modes ``I;16*``) is scaled down to 8 bits
    rather than clipped, which is what PIL's plain ``convert`` would do.
    """
    mode = _mode(channels)
    if image.mode == mode:
        return image
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257.0).round().astype(np.uint8))
    elif image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert(mode)


def load_image(path: str | Path, channels: int) -> Image.Image:
    """Open, fully decode (so truncated files fail here), orient by EXIF and convert one image file.

    Raises ValueError naming the file when it is not a readable image.
    """
    mode = _mode(channels)
    try:
        with Image.open(path) as image:
            image.load()
            return to_mode(ImageOps.exif_transpose(image), channels)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path} (as {mode}): {err}") from err


class ToMode:
    """Transform step converting a PIL image with :func:`to_mode` (a class, so loaders can pickle it)."""

    def __init__(self, channels: int) -> None:
        _mode(channels)
        self.channels = channels

    def __call__(self, image: Image.Image) -> Image.Image:
        return to_mode(image, self.channels)

    def __repr__(self) -> str:
        return f"ToMode(channels={self.channels})"


def pil_transform(input_shape: tuple[int, int, int], mean: Sequence[float], std: Sequence[float],
                  augment: Sequence[Callable[[Tensor], Tensor]] = ()) -> v2.Compose:
    """PIL image of any size and mode → normalized float tensor of ``input_shape``.

    Converts the mode, resizes the shorter side and centre-crops (no distortion), then applies ``augment`` to the
    uint8 tensor before scaling to [0, 1] and normalizing.
    """
    channels, height, width = input_shape
    return v2.Compose([ToMode(channels), v2.Resize(max(height, width), antialias=True), v2.CenterCrop((height, width)),
                       v2.PILToTensor(), *augment, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(mean), list(std))])


def read_idx(path: str | Path) -> np.ndarray:
    """Decode an IDX file of unsigned bytes (gzip-compressed or not) into an array of its header's shape.

    Checks the magic number and that the data holds exactly the bytes the header promises, so a truncated or
    corrupt file fails here with a ValueError naming it instead of as odd images later.
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({err})") from err
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise ValueError(f"{path}: not an IDX file (starts with 0x{data[:4].hex()}, expected 0x0000 then type and "
                         "dimension count)")
    if data[2] != IDX_UNSIGNED_BYTE:
        raise ValueError(f"{path}: IDX data type 0x{data[2]:02x} is not supported (expected 0x08, unsigned bytes)")
    ndim, header = data[3], 4 + 4 * data[3]
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, {ndim} dimensions need {header})")
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected, found = math.prod(shape), len(data) - header
    if found != expected:
        problem = "truncated" if found < expected else "longer than its header says"
        raise ValueError(f"{path}: {problem}: header promises {'×'.join(map(str, shape))} = {expected} bytes of "
                         f"data, found {found}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def stratified_split(labels: np.ndarray | Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of ``range(len(labels))`` into sorted (kept, held-out) index arrays.

    About ``fraction`` of every class is held out, ``round(fraction * n)`` in all (largest-remainder rounding across
    classes, ties broken by ``seed``), except that each class keeps at least one sample on the kept side.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = fraction * counts
    take = np.floor(quota).astype(np.int64)
    order = rng.permutation(len(classes))
    by_remainder = order[np.argsort(-(quota - take)[order], kind="stable")]
    take[by_remainder[: round(fraction * len(labels)) - int(take.sum())]] += 1
    take = np.minimum(take, counts - 1)
    held = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    held_idx = np.sort(np.concatenate([np.zeros(0, np.int64), *held]))
    return np.setdiff1d(np.arange(len(labels)), held_idx), held_idx


# ----------------------------------------------------------------------------------------------- batch transforms

class BatchAugment:
    """Per-sample random rotation, whole-pixel shift and horizontal flip of a [0, 1] batch in one ``grid_sample``.

    Shifts are uniform in ``-max_shift..max_shift`` pixels with black fill (``degrees=0`` is
    ``RandomCrop(size, padding=max_shift)`` up to float rounding), angles uniform in ±``degrees`` (bilinear), flips
    with probability 1/2.
    Vectorized because per-image torchvision calls would dominate an MNIST epoch on CPU.
    """

    def __init__(self, degrees: float = 0.0, max_shift: int = 0, hflip: bool = False) -> None:
        self.degrees, self.max_shift, self.hflip = degrees, max_shift, hflip

    def __call__(self, images: Tensor) -> Tensor:
        n, _, height, width = images.shape
        angle = (torch.rand(n) * 2 - 1) * math.radians(self.degrees)
        cos, sin = angle.cos(), angle.sin()
        tx, ty = torch.randint(-self.max_shift, self.max_shift + 1, (2, n)).float()
        # Output pixel p samples input R⁻¹(p - t), written in affine_grid's [-1, 1] coordinates.
        theta = torch.empty(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = cos, sin * height / width
        theta[:, 1, 0], theta[:, 1, 1] = -sin * width / height, cos
        theta[:, 0, 2] = -(cos * tx + sin * ty) * 2 / width
        theta[:, 1, 2] = (sin * tx - cos * ty) * 2 / height
        if self.hflip:
            theta[:, :, 0] *= torch.where(torch.rand(n) < 0.5, -1.0, 1.0)[:, None]
        grid = F.affine_grid(theta.to(images), [*images.shape], align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def __repr__(self) -> str:
        return f"BatchAugment(degrees={self.degrees}, max_shift={self.max_shift}, hflip={self.hflip})"


class NormalizeBatch:
    """Collate for in-memory pixel data: stack samples, scale uint8 to [0, 1], augment (optional), normalize."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], augment: BatchAugment | None = None) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment

    def __call__(self, samples: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        images, labels = default_collate(samples)
        images = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
        if self.augment is not None:
            images = self.augment(images)
        return (images - self.mean) / self.std, labels


# ----------------------------------------------------------------------------------------------- data modules

@dataclass(frozen=True)
class ImageSpec:
    """What a model needs before any data is loaded: class names, tensor shape (C, H, W), per-channel mean/std."""

    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


class VisionDataModule(PreprocessingDataModule):
    """Base of every image data module: common init args, metadata before ``setup``, seeded loaders, and the
    preprocessing ``predict-image`` needs as its checkpoint state.

    ``data_root`` is where the data set lives (None: ``$BP_APPS_DATA``, else ``./data``), ``val_fraction`` of the
    training data becomes validation (chosen by ``seed``), ``augment`` turns on training-time augmentation and
    ``download`` (the default) fetches a data set's files from its official source into the data root when they
    are missing there (``prepare_data``, on one process; the only case in which anything is written there); with
    ``download: false`` the network is never used. ``train_subset`` (digits, MNIST, Fashion-MNIST, CIFAR-10) trains
    on that many examples of the training part only, drawn by ``seed`` after validation is split off: small
    training sets, e.g. for the membership-inference audit of an overfitted model.
    """

    SPEC: ClassVar[ImageSpec]
    MUST_MATCH = ("class_names", "input_shape", "mean", "std")
    DOWNLOADER: ClassVar[Callable[..., object] | None] = None
    """torchvision's data set class that fetches this data set's files (MD5-checked); None: nothing to fetch."""
    HPARAMS_IGNORE: ClassVar[tuple[str, ...]] = ()
    """Arguments kept out of the hyperparameters (data set objects: a checkpoint holds plain values only)."""

    def __init__(self, data_root: str | None = None, batch_size: int = 128, val_fraction: float = 0.1, seed: int = 0,
                 num_workers: int = 0, augment: bool = False, download: bool = True,
                 train_subset: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=list(self.HPARAMS_IGNORE))
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be non-negative, got {num_workers}")
        if train_subset is not None and (isinstance(train_subset, bool) or not isinstance(train_subset, int)
                                         or train_subset < 1):
            raise ValueError(f"train_subset must be a positive number of examples or None, got {train_subset!r}")
        spec = self._spec()
        self.class_names: list[str] = list(spec.class_names)
        self.num_classes: int = len(spec.class_names)
        self.input_shape: tuple[int, int, int] = spec.input_shape
        self.mean: tuple[float, ...] = spec.mean
        self.std: tuple[float, ...] = spec.std
        self.eval_transform: v2.Compose = pil_transform(spec.input_shape, spec.mean, spec.std)
        self.skipped_images: list[str] = []
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _spec(self) -> ImageSpec:
        """This data set's metadata; fixed data sets declare ``SPEC``, folders scan themselves."""
        return self.SPEC

    def preprocessing(self) -> dict[str, Any]:
        """What ``predict-image`` needs: class names, input shape, normalisation."""
        return {"class_names": list(self.class_names), "input_shape": list(self.input_shape), "mean": list(self.mean),
                "std": list(self.std)}

    def metrics_summary(self) -> dict[str, Any]:
        """For ``metrics.json``: the class names and the images skipped as unreadable."""
        return {"class_names": list(self.class_names),
                "skipped_images": {"count": len(self.skipped_images), "paths": list(self.skipped_images)}}

    @property
    def data_root_path(self) -> Path:
        """The folder the data is read from: ``data_root``, else ``$BP_APPS_DATA``, else ``./data`` (looked up now)."""
        return resolve_data_root(self.hparams.data_root)

    # -- downloads --------------------------------------------------------------------------------------------

    def data_folder(self) -> Path:
        """The folder under the data root that holds this data set's files."""
        return self.data_root_path

    def missing_files(self) -> list[str]:
        """The names of this data set's files that are not in :meth:`data_folder` (none for embedded data)."""
        return []

    def download_targets(self) -> list[Path]:
        """What :attr:`DOWNLOADER` writes into the data root (removed again when a download fails)."""
        return [self.data_folder()]

    def prepare_data(self) -> None:
        """With ``download``, fetch the data set's missing files with torchvision (MD5-checked; Lightning runs this
        on one process). Nothing is fetched when every file is present. A failed download leaves nothing behind
        and raises FileNotFoundError naming the folder."""
        if self.DOWNLOADER is None or not self.hparams.download or not self.missing_files():
            return
        root, folder = self.data_root_path, self.data_folder()
        before = {target: _tree(target) for target in self.download_targets()}
        created = [p for p in (root, *root.parents) if not p.exists()]
        log.info("downloading %s into %s (missing: %s)", type(self).__name__, folder.absolute(),
                 ", ".join(self.missing_files()))
        try:
            self.DOWNLOADER(root=str(root), download=True)
        except BaseException as err:
            _remove_new_files(before, created)
            if not isinstance(err, (OSError, RuntimeError, EOFError, tarfile.TarError, zlib.error)):
                raise
            reason = " ".join(str(err).split()) or type(err).__name__
            raise FileNotFoundError(
                f"{type(self).__name__}: the data is not in {folder.absolute()} (missing: "
                f"{', '.join(self.missing_files())}) and downloading it from its official source failed: "
                f"{reason[:600]}. Connect to the internet and run again (the files are MD5-checked), or put the "
                f"files there yourself, or choose a data root that holds them: "
                f"{data_root_hint(self.hparams.data_root)}.") from err

    def _collate(self, train: bool) -> Callable | None:
        """The loaders' collate function (None: PyTorch's default)."""
        return None

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        """A loader over ``dataset``. Training batches are shuffled by ``(seed, epoch)`` and resume exactly in the
        middle of an epoch (:func:`~bp_apps.core.resume.resumable_loader`), augmentation included."""
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for data loaders")
        workers = self.hparams.num_workers
        kwargs = dict(num_workers=workers, persistent_workers=workers > 0, collate_fn=self._collate(train),
                      pin_memory=torch.cuda.is_available())
        if train:
            return resumable_loader(dataset, self.hparams.batch_size, self.hparams.seed, **kwargs)
        return evaluation_loader(dataset, self.trainer, batch_size=self.hparams.batch_size, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)


class _InMemoryDataModule(VisionDataModule):
    """Data sets held as pixel tensors (uint8 0..255 or float 0..1); loaders normalize and augment per batch."""

    AUGMENT: ClassVar[BatchAugment]

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Training images (N, C, H, W) and int64 labels, then the test images and labels."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        self.check_model()
        if self.train_set is not None:
            return
        x_train, y_train, x_test, y_test = self._load()
        kept, held = stratified_split(y_train.numpy(), self.hparams.val_fraction, self.hparams.seed)
        kept, held = torch.from_numpy(kept), torch.from_numpy(held)
        subset = self.hparams.get("train_subset")
        if subset is not None:
            if subset > len(kept):
                raise ValueError(f"train_subset={subset} exceeds the {len(kept)} training examples left after the "
                                 "validation split")
            generator = torch.Generator().manual_seed(self.hparams.seed)
            kept = kept[torch.randperm(len(kept), generator=generator)[:subset].sort().values]
        self.train_set = TensorDataset(x_train[kept], y_train[kept])
        self.val_set = TensorDataset(x_train[held], y_train[held])
        self.test_set = TensorDataset(x_test, y_test)

    def _collate(self, train: bool) -> NormalizeBatch:
        return NormalizeBatch(self.mean, self.std, self.AUGMENT if train and self.hparams.augment else None)


@dataclass(frozen=True)
class DigitsSplit:
    """scikit-learn's digits as flattened images scaled to [0, 1] (float32) and integer labels, train and test."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    num_features: int = 64
    num_classes: int = 10


def load_digits_split(test_size: float = 0.25, random_state: int = 0, standardize: bool = False) -> DigitsSplit:
    """The digits with a stratified train/test split (25 %, ``random_state`` 0 by default).

    Pixels are scaled to [0, 1]; with ``standardize`` each pixel is then centred and scaled by
    the training part's mean and standard deviation (pixels constant in training keep scale 1).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, data.target, test_size=test_size, stratify=data.target,
                                              random_state=random_state)
    if standardize:
        mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
        std[std == 0] = 1.0
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return DigitsSplit(torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(),
                       torch.from_numpy(x_te), torch.from_numpy(y_te).long())


class DigitsImageDataModule(_InMemoryDataModule):
    """scikit-learn's digits as 1×8×8 images (embedded: ``data_root`` and ``download`` are unused).

    The test set is the official stratified 25 % split (``random_state`` 0, 1,347 train / 450 test images).
    """

    # Pixels /16; mean and (population) std of all pixels of the 1,347 training images.
    SPEC = ImageSpec(tuple(str(d) for d in range(10)), (1, 8, 8), (0.3052,), (0.3760,))
    AUGMENT = BatchAugment(max_shift=1)

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        split = load_digits_split(test_size=0.25, random_state=0)
        return split.x_train.view(-1, 1, 8, 8), split.y_train, split.x_test.view(-1, 1, 8, 8), split.y_test


class _IdxDataModule(_InMemoryDataModule):
    """MNIST-style data from the four original IDX files in ``<data_root>/<FOLDER>/raw/`` (``.gz`` or unpacked),
    fetched there by torchvision (MD5-checked) when they are missing and ``download`` is on."""

    FOLDER: ClassVar[str]

    def data_folder(self) -> Path:
        return self.data_root_path / self.FOLDER / "raw"

    def download_targets(self) -> list[Path]:
        return [self.data_root_path / self.FOLDER]

    def _idx_paths(self) -> dict[str, Path | None]:
        """Each IDX file's path in :meth:`data_folder` (``.gz`` or unpacked), None where it is missing."""
        raw = self.data_folder()
        return {name: next((p for p in (raw / f"{name}.gz", raw / name) if p.is_file()), None) for name in IDX_FILES}

    def missing_files(self) -> list[str]:
        return [f"{name}(.gz)" for name, path in self._idx_paths().items() if path is None]

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raw, paths = self.data_folder(), self._idx_paths()
        missing = self.missing_files()
        if missing:
            raise FileNotFoundError(
                f"{self.FOLDER} data not found: {', '.join(missing)} missing in {raw.absolute()}. With "
                f"`download: true` (--data.download=true, the default) the trainer's prepare_data() fetches it with "
                f"torchvision (MD5-checked) into the data root; or point the data root at a folder holding "
                f"{self.FOLDER}/raw/ with the four IDX files (.gz or unpacked); "
                f"{data_root_hint(self.hparams.data_root)}.")
        arrays = {name: read_idx(path) for name, path in paths.items()}
        return (*self._images_and_labels(arrays, paths, "train"), *self._images_and_labels(arrays, paths, "t10k"))

    def _images_and_labels(self, arrays: dict[str, np.ndarray], paths: dict[str, Path | None],
                           part: str) -> tuple[Tensor, Tensor]:
        """One part's images (N, 1, H, W) uint8 and labels int64, checked against each other and ``SPEC``."""
        images_name, labels_name = f"{part}-images-idx3-ubyte", f"{part}-labels-idx1-ubyte"
        images, labels = arrays[images_name], arrays[labels_name]
        height, width = self.input_shape[1:]
        if images.ndim != 3 or images.shape[1:] != (height, width):
            raise ValueError(f"{paths[images_name]}: expected N×{height}×{width} images (IDX3, magic 2051), "
                             f"found shape {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{paths[labels_name]}: expected {len(images)} labels (IDX1, magic 2049) to match "
                             f"{paths[images_name]}, found shape {labels.shape}")
        if labels.max(initial=0) >= self.num_classes:
            raise ValueError(f"{paths[labels_name]}: labels must be below {self.num_classes}, found {labels.max()}")
        return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


class MNISTDataModule(_IdxDataModule):
    """MNIST handwritten digits (60,000 train / 10,000 test, 1×28×28) from ``<data_root>/MNIST/raw/``."""

    FOLDER = "MNIST"
    DOWNLOADER = torchvision.datasets.MNIST
    SPEC = ImageSpec(tuple(str(d) for d in range(10)), (1, 28, 28), (0.1307,), (0.3081,))
    AUGMENT = BatchAugment(degrees=10.0, max_shift=3)


class FashionMNISTDataModule(_IdxDataModule):
    """Fashion-MNIST clothing images (60,000 train / 10,000 test, 1×28×28) from ``<data_root>/FashionMNIST/raw/``."""

    FOLDER = "FashionMNIST"
    DOWNLOADER = torchvision.datasets.FashionMNIST
    SPEC = ImageSpec(("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"), (1, 28, 28), (0.2860,), (0.3530,))
    AUGMENT = BatchAugment(degrees=10.0, max_shift=3, hflip=True)


class CIFAR10DataModule(_InMemoryDataModule):
    """CIFAR-10 (50,000 train / 10,000 test, 3×32×32) from ``<data_root>/cifar-10-batches-py/`` via torchvision."""

    SPEC = ImageSpec(("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
                     (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    AUGMENT = BatchAugment(max_shift=4, hflip=True)  # RandomCrop(32, padding=4) + horizontal flip
    DOWNLOADER = torchvision.datasets.CIFAR10

    def data_folder(self) -> Path:
        return self.data_root_path / "cifar-10-batches-py"

    def download_targets(self) -> list[Path]:
        return [self.data_root_path / "cifar-10-python.tar.gz", self.data_folder()]

    def missing_files(self) -> list[str]:
        return [name for name in CIFAR10_FILES if not (self.data_folder() / name).is_file()]

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        folder = self.data_folder()
        missing = self.missing_files()
        if missing:
            raise FileNotFoundError(
                f"CIFAR-10 data not found: {', '.join(missing)} missing in {folder.absolute()}. With "
                "`download: true` (--data.download=true, the default) the trainer's prepare_data() fetches it with "
                "torchvision (MD5-checked) into the data root; or point the data root at a folder holding "
                "cifar-10-batches-py/ (the unpacked python version of CIFAR-10); "
                f"{data_root_hint(self.hparams.data_root)}.")
        try:
            parts = [torchvision.datasets.CIFAR10(root=str(self.data_root_path), train=train)
                     for train in (True, False)]
        except RuntimeError as err:
            raise ValueError(f"CIFAR-10 files in {folder.absolute()} are corrupt or incomplete ({err})") from err
        return tuple(tensor for part in parts for tensor in (torch.from_numpy(part.data).permute(0, 3, 1, 2)
                                                            .contiguous(), torch.tensor(part.targets)))


class ImageFileDataset(Dataset):
    """(path, label) pairs decoded with :func:`load_image` and passed through ``transform`` when accessed."""

    def __init__(self, samples: Sequence[tuple[Path, int]], channels: int,
                 transform: Callable[[Image.Image], Tensor]) -> None:
        self.samples, self.channels, self.transform = list(samples), channels, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        return self.transform(load_image(path, self.channels)), label


class ImageFolderDataModule(VisionDataModule):
    """A folder with one sub-folder of images per class (face identification: one folder per person).

    Either ``data_root/<class>/...`` (train/val/test split off by ``seed``, stratified: ``test_fraction`` of all
    images, then ``val_fraction`` of the rest), or ``data_root/train/<class>/...`` with optional ``val/`` and
    ``test/`` beside it (a missing one is split off ``train/`` the same way). Class names are the sorted folder
    names; hidden files and folders are ignored, so are files whose extension is not in ``IMAGE_EXTENSIONS``.
    Images of any size and mode become ``channels``×``image_size``×``image_size`` (shorter side resized, centre
    crop) normalized with mean = std = 0.5 per channel, i.e. to [-1, 1]. An unreadable file raises ValueError
    naming it when loaded; ``skip_bad_images`` decodes every file once in ``setup`` and drops the bad ones
    (listed in ``skipped_images``). ``download`` has no effect: a local folder has nothing to fetch.
    """

    def __init__(self, data_root: str | None = None, image_size: int = 64, channels: int = 3,
                 test_fraction: float = 0.2,
                 skip_bad_images: bool = False, batch_size: int = 128, val_fraction: float = 0.1, seed: int = 0,
                 num_workers: int = 0, augment: bool = False, download: bool = False) -> None:
        super().__init__(data_root=data_root, batch_size=batch_size, val_fraction=val_fraction, seed=seed,
                         num_workers=num_workers, augment=augment, download=download)

    def _spec(self) -> ImageSpec:
        channels, size, test_fraction = self.hparams.channels, self.hparams.image_size, self.hparams.test_fraction
        _mode(channels)
        if size < 1:
            raise ValueError(f"image_size must be at least 1, got {size}")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        class_dirs = _class_dirs(self._train_dir())
        return ImageSpec(tuple(d.name for d in class_dirs), (channels, size, size), (0.5,) * channels,
                         (0.5,) * channels)

    def _train_dir(self) -> Path:
        """The folder whose sub-folders are the classes: ``data_root/train`` if present, else ``data_root``."""
        root = self.data_root_path
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root.absolute()} does not exist; "
                                    f"{data_root_hint(self.hparams.data_root)}")
        return root / "train" if (root / "train").is_dir() else root

    def _scan(self, folder: Path, require_all: bool) -> list[tuple[Path, int]]:
        """(file, label) for the image files under ``folder``'s class sub-folders, sorted for determinism."""
        label_of = {name: label for label, name in enumerate(self.class_names)}
        samples, empty = [], []
        for class_dir in _class_dirs(folder):
            if class_dir.name not in label_of:
                raise ValueError(f"{class_dir.absolute()}: class {class_dir.name!r} has no folder in "
                                 f"{self._train_dir().absolute()}")
            files = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(class_dir).parts))
            empty += [] if files else [class_dir.name]
            samples += [(path, label_of[class_dir.name]) for path in files]
        if empty and require_all:
            raise ValueError(f"{folder.absolute()}: class folder(s) without image files: {', '.join(empty)} "
                             f"(extensions read: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        return samples

    def _drop_unreadable(self, samples: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
        """``samples`` without the files that fail to decode; those are added to ``skipped_images``."""
        kept = []
        for path, label in samples:
            try:
                load_image(path, self.hparams.channels)
            except ValueError:
                self.skipped_images.append(str(path))
            else:
                kept.append((path, label))
        return kept

    def setup(self, stage: str | None = None) -> None:
        self.check_model()
        if self.train_set is not None:
            return
        root, train_dir = self.data_root_path, self._train_dir()
        parts: dict[str, list[tuple[Path, int]] | None] = {
            "train": self._scan(train_dir, require_all=True),
            **{name: self._scan(root / name, require_all=False) if train_dir != root and (root / name).is_dir()
               else None for name in ("val", "test")}}
        if self.hparams.skip_bad_images:
            parts = {name: None if part is None else self._drop_unreadable(part) for name, part in parts.items()}
            if self.skipped_images:
                log.warning("skipped %d unreadable image file(s) under %s (listed in skipped_images), first: %s",
                            len(self.skipped_images), root.absolute(), self.skipped_images[0])
        train = parts["train"]
        for name, fraction, salt in (("test", self.hparams.test_fraction, 0), ("val", self.hparams.val_fraction, 1)):
            if parts[name] is None:
                kept, held = stratified_split([label for _, label in train], fraction, self.hparams.seed * 2 + salt)
                train, parts[name] = [train[i] for i in kept], [train[i] for i in held]
        if not train:
            raise ValueError(f"{train_dir.absolute()}: no readable training images")
        augment = [v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=10.0, translate=(0.05, 0.05), scale=(0.95, 1.05)),
                   v2.ColorJitter(brightness=0.2, contrast=0.2)] if self.hparams.augment else []
        channels, train_transform = self.hparams.channels, pil_transform(self.input_shape, self.mean, self.std, augment)
        self.train_set = ImageFileDataset(train, channels, train_transform)
        self.val_set = ImageFileDataset(parts["val"], channels, self.eval_transform)
        self.test_set = ImageFileDataset(parts["test"], channels, self.eval_transform)


# ----------------------------------------------------------------------------------------------- your own data

def _pair(dataset: Any, index: int, name: str) -> tuple[Any, Any]:
    """Item ``index`` of ``dataset`` as (image, label); a ValueError naming the data set and item otherwise."""
    item = dataset[index]
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise ValueError(f"{name} item {index}: expected an (image, label) pair, got {type(item).__name__}")
    return item[0], item[1]


def _label(value: Any, where: str) -> int:
    """An integer class label from an int, a numpy integer or a one-element integer tensor."""
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        array = np.asarray(value.detach().cpu() if torch.is_tensor(value) else value)
        if array.size == 1 and np.issubdtype(array.dtype, np.integer):
            return int(array.reshape(()))
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    raise ValueError(f"{where}: the label must be an integer class index, got {value!r}")


def _dataset_labels(dataset: Any, name: str) -> np.ndarray:
    """Every label of ``dataset``: its ``targets`` (torchvision's), a TensorDataset's second tensor, or else each
    item's label (which loads every item once)."""
    targets = getattr(dataset, "targets", None)
    if targets is None and isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        targets = dataset.tensors[1]
    if targets is None:
        targets = [_label(_pair(dataset, i, name)[1], f"{name} item {i}") for i in range(len(dataset))]
    labels = np.asarray(targets.cpu() if torch.is_tensor(targets) else targets)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}: labels (its targets) must be one integer class index per item, got shape "
                         f"{labels.shape} of {labels.dtype}")
    return labels


def _image_shape(image: Any, where: str) -> tuple[int, int, int]:
    """(C, H, W) of a PIL image (1 channel for gray modes, else 3: RGB) or of a (C, H, W) / (H, W) tensor or array."""
    if isinstance(image, Image.Image):
        gray = image.mode in ("1", "L", "LA", "I", "F") or image.mode.startswith("I;16")
        return (1 if gray else 3, image.height, image.width)
    shape = tuple(torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image).shape)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) != 3:
        raise ValueError(f"{where}: an image must be a PIL image or a (C, H, W) or (H, W) tensor, got shape {shape}")
    return shape  # type: ignore[return-value]


def _floats(value: Any, name: str, channels: int) -> tuple[float, ...] | None:
    """``mean`` or ``std`` as one float per channel (a tensor, list or number), None when not given."""
    if value is None:
        return None
    values = tuple(float(v) for v in torch.as_tensor(value, dtype=torch.float64).flatten().tolist())
    if len(values) == 1 and channels > 1:
        values *= channels
    if len(values) != channels:
        raise ValueError(f"{name} needs one value per channel ({channels}), got {list(values)}")
    if name == "std" and min(values) <= 0:
        raise ValueError(f"std must be positive, got {list(values)}")
    return values


class ImageItems(Dataset):
    """A data set's ``(image, label)`` items as ``(normalised float32 tensor of input_shape, int label)``.

    PIL images are converted as image folders are (mode, shorter side resized, centre crop); tensors and arrays must
    have ``input_shape`` already ((H, W) for one channel), uint8 pixels are scaled to [0, 1]. A wrong size or a label
    outside ``0..num_classes-1`` is a ValueError naming ``name`` and the item."""

    def __init__(self, dataset: Any, name: str, input_shape: tuple[int, int, int], mean: Sequence[float],
                 std: Sequence[float], num_classes: int) -> None:
        self.dataset, self.name, self.input_shape, self.num_classes = dataset, name, tuple(input_shape), num_classes
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.pil = pil_transform(self.input_shape, mean, std) if input_shape[0] in (1, 3) else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, raw_label = _pair(self.dataset, index, self.name)
        where = f"{self.name} item {index}"
        if isinstance(image, Image.Image):
            if self.pil is None:
                raise ValueError(f"{where}: a PIL image, but input_shape has {self.input_shape[0]} channels (PIL "
                                 "images are read as gray, 1, or RGB, 3)")
            x = self.pil(image)
        else:
            x = image if torch.is_tensor(image) else torch.as_tensor(np.asarray(image))
            x = x.unsqueeze(0) if x.ndim == 2 else x
            if tuple(x.shape) != self.input_shape:
                raise ValueError(f"{where}: image of shape {tuple(x.shape)}, but input_shape is {self.input_shape} "
                                 "(tensor images must all have it; PIL images are resized to it)")
            x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
            x = (x - self.mean) / self.std
        label = _label(raw_label, where)
        if not 0 <= label < self.num_classes:
            raise ValueError(f"{where}: label {label} is outside 0..{self.num_classes - 1} ({self.num_classes} "
                             "classes: give num_classes or class_names)")
        return x, label


class DatasetDataModule(VisionDataModule):
    """Map-style data sets of ``(image, label)`` items as an image data module: a torchvision data set
    (``CIFAR10``, ``ImageFolder``, ``FakeData`` ...) or your own ``Dataset``; in a config each is a ``class_path``
    with its ``init_args``.

    Images are PIL images (converted to ``input_shape``'s channels, resized and centre-cropped) or (C, H, W) / (H, W)
    tensors or arrays of ``input_shape`` (uint8 0..255 or float 0..1); labels are integer class indices. Every image
    is then normalised by ``mean`` and ``std``. What the model and ``predict-image`` need comes from the arguments,
    else from the data, right after ``__init__``: ``class_names`` as given, else the training set's ``classes``
    (torchvision's), else ``"0"``, ``"1"`` ... for ``num_classes`` classes (given, else the largest training label
    plus one, from its ``targets`` when it has them, else from every item); ``input_shape`` as given, else the first
    training image's; ``mean`` and ``std`` as given, else 0 and 1 (no normalisation). Without ``val``,
    ``val_fraction`` of the training items (stratified, chosen by ``seed``) validate; without ``test``, testing uses
    the validation items. The data sets are not saved as hyperparameters (a checkpoint holds no data)."""

    HPARAMS_IGNORE = ("train", "val", "test", "num_classes", "input_shape")
    """Data sets are no hyperparameters; the sizes are the model's (Lightning's loggers refuse one name with two
    values, e.g. an ``input_shape`` left out here and found in the data), and the checkpoint state keeps them."""

    def __init__(self, train: Dataset, val: Dataset | None = None, test: Dataset | None = None,
                 class_names: list[str] | None = None, num_classes: int | None = None,
                 input_shape: list[int] | None = None, mean: list[float] | None = None,
                 std: list[float] | None = None, batch_size: int = 128, val_fraction: float = 0.1, seed: int = 0,
                 num_workers: int = 0) -> None:
        self.sources = {"train": train, "val": val, "test": test}
        self.given = {"num_classes": num_classes, "input_shape": input_shape}
        super().__init__(batch_size=batch_size, val_fraction=val_fraction, seed=seed, num_workers=num_workers,
                         augment=False, download=False)
        if val is None and val_fraction <= 0:
            raise ValueError("DatasetDataModule: without val, val_fraction must be positive (it holds out the "
                             "validation items)")

    def _spec(self) -> ImageSpec:
        h, train = self.hparams, self.sources["train"]
        num_classes, input_shape = self.given["num_classes"], self.given["input_shape"]
        for name, dataset in self.sources.items():
            if dataset is not None and not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
                raise ValueError(f"DatasetDataModule: {name} must be a map-style data set (with __getitem__ and "
                                 f"__len__) of (image, label) items, got {type(dataset).__name__}")
        if train is None or len(train) == 0:
            raise ValueError("DatasetDataModule: train is empty (or missing)")
        names = h.class_names if h.class_names is not None else getattr(train, "classes", None)
        if names is not None:
            names = [str(n) for n in names]
            if num_classes is not None and len(names) != num_classes:
                raise ValueError(f"DatasetDataModule: {len(names)} class_names but num_classes={num_classes}")
        else:
            count = num_classes if num_classes is not None else int(_dataset_labels(train, "train").max()) + 1
            names = [str(i) for i in range(count)]
        if len(names) < 2:
            raise ValueError(f"DatasetDataModule: a classifier needs at least 2 classes, got {names}")
        if input_shape is not None:
            shape = tuple(int(v) for v in input_shape)
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"DatasetDataModule: input_shape must be (channels, height, width), got {shape}")
        else:
            shape = _image_shape(_pair(train, 0, "train")[0], "train item 0")
        channels = shape[0]
        mean = _floats(h.mean, "mean", channels) or (0.0,) * channels
        std = _floats(h.std, "std", channels) or (1.0,) * channels
        return ImageSpec(tuple(names), shape, mean, std)  # type: ignore[arg-type]

    def setup(self, stage: str | None = None) -> None:
        self.check_model()
        if self.train_set is not None:
            return
        def items(name: str) -> ImageItems:
            return ImageItems(self.sources[name], name, self.input_shape, self.mean, self.std, self.num_classes)

        train = items("train")
        if self.sources["val"] is None:
            kept, held = stratified_split(_dataset_labels(self.sources["train"], "train"), self.hparams.val_fraction,
                                          self.hparams.seed)
            self.train_set, self.val_set = Subset(train, kept.tolist()), Subset(train, held.tolist())
        else:
            self.train_set, self.val_set = train, items("val")
        self.test_set = items("test") if self.sources["test"] is not None else self.val_set


def user_image_preprocessing(data: Any, model: Any) -> dict[str, Any]:
    """What ``predict-image`` needs, from a data module of the user's own (:func:`~bp_apps.core.datalink.data_value`:
    its attributes, else its hyperparameters) or else the model's: class names (the model's: linked from the data,
    else class indices), ``input_shape`` (the model's, which the first batches are checked against), ``mean`` 0 and
    ``std`` 1 per channel (no normalisation). A ValueError says which value disagrees with the model."""
    built = [int(v) for v in model.hparams["input_shape"]]
    given = data_value(data, "input_shape")
    shape = built if given is None else [int(v) for v in given]
    if shape != built:
        raise ValueError(f"the data module gives input_shape={shape} but the model was built for {built}: build it "
                         f"with input_shape={shape} (bp-apps links the data module's input_shape)")
    names = data_value(data, "class_names")
    names = [str(n) for n in names] if names is not None else list(model.class_names)
    if len(names) != model.num_classes:
        raise ValueError(f"the data module names {len(names)} classes (class_names) but the model predicts "
                         f"{model.num_classes}: build it with num_classes={len(names)}")
    channels = shape[0]
    mean = _floats(data_value(data, "mean"), "the data module's mean", channels) or (0.0,) * channels
    std = _floats(data_value(data, "std"), "std", channels) or (1.0,) * channels
    return {"class_names": names, "input_shape": shape, "mean": list(mean), "std": list(std)}


def check_image_batch(batch: Any, model: Any, stage: str) -> None:
    """Refuse a batch the image classifier cannot take, naming the setting to change: images that are not a float
    ``(B, C, H, W)`` tensor of the model's ``input_shape``, labels outside ``0..num_classes-1``."""
    pair = isinstance(batch, (tuple, list)) and len(batch) == 2
    images, labels = (batch[0], batch[1]) if pair else (batch, None)
    if labels is None and stage != "predict":
        raise ValueError(f"{stage} batches must be (images, labels) pairs, got {type(batch).__name__}")
    if not torch.is_tensor(images) or images.ndim != 4 or not images.is_floating_point():
        found = f"{images.dtype} of shape {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{stage} images must be a float tensor (batch, channels, height, width), got {found}")
    shape, built = list(images.shape[1:]), [int(v) for v in model.hparams["input_shape"]]
    if shape != built:
        raise ValueError(f"the {stage} images are {'×'.join(map(str, shape))} but the model was built for "
                         f"input_shape={built}: build it with input_shape={shape} (--model.input_shape="
                         f"[{','.join(map(str, shape))}]), or "
                         "give the data module an input_shape attribute (bp-apps links it)")
    if labels is None:
        return
    if not torch.is_tensor(labels) or labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{stage} labels must be an integer tensor of class indices (batch,), got "
                         f"{labels.dtype if torch.is_tensor(labels) else type(labels).__name__}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= model.num_classes:
        raise ValueError(f"the {stage} labels run from {low} to {high} but the model has num_classes="
                         f"{model.num_classes}: build it with num_classes={high + 1} (--model.num_classes), or give "
                         "the data module a num_classes attribute (bp-apps links it)")


def user_data_check() -> UserDataModuleCheck:
    """The callback the image classifier attaches for a data module of the user's own: its preprocessing
    (:func:`user_image_preprocessing`) saved for ``predict-image``, its first batches checked
    (:func:`check_image_batch`)."""
    return UserDataModuleCheck(user_image_preprocessing, check_image_batch)


def _tree(path: Path) -> set[Path] | None:
    """``path`` and everything under it, None when it does not exist."""
    if not path.exists():
        return None
    return {path, *path.rglob("*")} if path.is_dir() else {path}


def _remove_new_files(before: dict[Path, set[Path] | None], created: Sequence[Path]) -> None:
    """Undo a failed download: remove what is new under each target since ``before`` (from :func:`_tree`; files,
    then the folders they leave empty) and the data-root folders the download ``created`` (innermost first)."""
    for target, existing in before.items():
        new = (_tree(target) or set()) - (existing or set())
        for path in sorted(new, key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                if not any(path.iterdir()):
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)
    for folder in created:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _class_dirs(folder: Path) -> list[Path]:
    """The non-hidden sub-folders of ``folder``, sorted; a ValueError naming it when there are none."""
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{folder.absolute()} has no class sub-folders: expected one sub-folder of images per "
                         f"class (e.g. {folder}/alice/001.jpg), or train/ (and optional val/, test/) sub-folders "
                         "that each hold them")
    return class_dirs


DATAMODULES: dict[str, type[VisionDataModule]] = {
    "digits": DigitsImageDataModule,
    "mnist": MNISTDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "imagefolder": ImageFolderDataModule,
}
