"""Predict masks from Python: a trained model plus the preprocessing and inference settings of its run.

:class:`Segmenter` bundles what ``tools/predict.py`` does for files into an object that takes
images in memory (paths, PIL images, NumPy arrays) and returns NumPy masks or probabilities at the
input's size. It preprocesses exactly as validation did (``augment.val``, then ``data.mean``/``std``)
and runs :func:`segfocal.evaluation.predict_logits` with the run's ``eval`` settings and precision,
so its masks are those of ``tools/predict.py`` for the same checkpoint (which also switches images
above ``--max-pixels`` to slide mode; pass ``mode="slide"`` for such images here).

    segmenter = Segmenter.from_checkpoint("runs/synthetic_unet_focal/best.pt")
    mask = segmenter.predict("street.jpg")          # (H, W) class indices

A checkpoint calibrated by ``segfocal calibrate`` (or ``train.calibrate``) carries a bias per class
that its decisions add to the logits: :meth:`Segmenter.predict` and :meth:`Segmenter.predict_proba`
apply it (``segmenter.calibrated`` says whether there is one), :meth:`Segmenter.logits` gives the raw
logits, and ``calibrated=False`` in :meth:`Segmenter.from_checkpoint` leaves it out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .config import Config, class_names, load_config
from .data import build_transform, pipeline_image, read_image
from .data.images import check_channels, pil_array
from .engine.calibrate import stored_calibration
from .engine.checkpoint import load_checkpoint
from .engine.distributed import resolve_device
from .engine.precision import Precision, inference_precision
from .engine.restore import prepare_for_inference, restore_with_config
from .evaluation import predict_logits
from .evaluation.calibration import Calibration

ImageInput = Union[str, Path, Image.Image, np.ndarray]
ConfigInput = Union[Config, str, Path]
DeviceInput = Union[str, torch.device, None]


class Segmenter:
    """A model ready for inference on single images or lists of them.

    ``mode`` (``"whole"`` or ``"slide"``) and ``flip`` override the config's ``eval.mode`` and
    ``eval.flip``; ``device=None`` picks the GPU when CUDA is available, else the CPU (whatever
    device the run trained on); ``calibration``: a fitted :class:`~segfocal.evaluation.calibration.Calibration`
    whose bias the decisions add. Attributes: ``model`` (in eval mode on ``device``), ``config``,
    ``device``, ``mode``, ``flip``, ``num_classes``, ``class_names``, ``calibration``.
    """

    def __init__(self, model: nn.Module, config: ConfigInput, device: DeviceInput = None,
                 mode: Optional[str] = None, flip: Optional[bool] = None,
                 calibration: Optional[Calibration] = None) -> None:
        """Wrap ``model`` (already built and loaded; it is moved to ``device`` and put in eval mode)."""
        self.config = _as_config(config)
        self.device = _as_device(device)
        self.model = prepare_for_inference(model, self.config, self.device)
        ev, data = self.config.eval, self.config.data
        self.mode = ev.mode if mode is None else mode
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {self.mode!r}")
        self.flip = ev.flip if flip is None else bool(flip)
        self.num_classes = data.num_classes
        self.class_names = class_names(data.class_names, data.num_classes)
        self._channels = self.config.model.in_channels
        self._transform = build_transform(self.config.augment.val, data.mean, data.std, scale=data.scale)
        self._precision = inference_precision(self.config.train.amp, self.device)
        if calibration is not None and len(calibration.bias) != self.num_classes:
            raise ValueError(f"the calibration has {len(calibration.bias)} biases for {self.num_classes} classes")
        self.calibration = calibration
        self._bias = None if calibration is None else calibration.tensor(self.device).view(1, -1, 1, 1)

    @property
    def calibrated(self) -> bool:
        """Whether :meth:`predict` and :meth:`predict_proba` add a calibration's bias to the logits."""
        return self.calibration is not None

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], config: Optional[ConfigInput] = None, device: DeviceInput = None,
                        mode: Optional[str] = None, flip: Optional[bool] = None,
                        calibrated: bool = True) -> "Segmenter":
        """A Segmenter for a trainer checkpoint (``last.pt``/``best.pt``) or a bare state-dict file.

        The config is the one the trainer saved in the checkpoint unless ``config`` (a
        :class:`Config` or a YAML file) is given, which a bare state dict needs. The checkpoint's
        calibration is applied unless ``calibrated=False``. A missing config, weights that do not fit
        the model, or a calibration of another class count raise
        :class:`~segfocal.engine.checkpoint.CheckpointError` naming the file.
        """
        target = _as_device(device)
        contents = load_checkpoint(path)
        cfg, model = restore_with_config(path, target, None if config is None else _as_config(config), contents)
        calibration = stored_calibration(contents, cfg.data.num_classes, path) if calibrated else None
        return cls(model, cfg, target, mode=mode, flip=flip, calibration=calibration)

    def predict(self, image: Union[ImageInput, Sequence[ImageInput]]) -> Union[np.ndarray, List[np.ndarray]]:
        """The class-index mask (H, W) of ``image`` at its own size; a list of them for a list of images.

        Masks are uint8 when there are at most 256 classes (an eighth of int64's memory, and what
        ``PIL.Image.fromarray`` writes as a PNG, like ``tools/predict.py``), else int64.
        """
        dtype = torch.uint8 if self.num_classes <= 256 else torch.int64
        return self._run(image, lambda logits: self.decided(logits).argmax(dim=1).to(dtype))

    def predict_proba(self, image: Union[ImageInput, Sequence[ImageInput]]) -> Union[np.ndarray, List[np.ndarray]]:
        """Float32 softmax probabilities (C, H, W) of ``image`` at its own size; a list for a list of images.

        When :attr:`calibrated`, they are those of the calibrated logits (the bias shifts each class's
        prior), so their argmax is :meth:`predict`'s decision; ``softmax(logits(image))`` gives the raw ones.
        """
        return self._run(image, lambda logits: self.decided(logits).softmax(dim=1))

    def logits(self, image: Union[ImageInput, Sequence[ImageInput]]) -> Union[np.ndarray, List[np.ndarray]]:
        """Float32 raw logits (C, H, W) of ``image`` at its own size, without any calibration; a list for a list."""
        return self._run(image, lambda logits: logits)

    def decided(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits [B, C, H, W] the decisions are taken on: plus the calibration's bias, when there is one
        (public for callers that compute logits themselves, as tiled prediction does)."""
        return logits if self._bias is None else logits.float() + self._bias

    def _run(self, images: Union[ImageInput, Sequence[ImageInput]],
             finish: Callable[[torch.Tensor], torch.Tensor]) -> Union[np.ndarray, List[np.ndarray]]:
        """``finish`` of each image's logits; images of one size run together, ``eval.batch_size`` at a time."""
        many = isinstance(images, (list, tuple))
        arrays = [self._as_array(image) for image in (images if many else [images])]
        results: List[Optional[np.ndarray]] = [None] * len(arrays)
        for indices in _batches(arrays, self.config.eval.batch_size):
            outputs = finish(self._logits([arrays[index] for index in indices])).cpu().numpy()
            for index, output in zip(indices, outputs):
                results[index] = output
        return results if many else results[0]

    def _logits(self, arrays: List[np.ndarray]) -> torch.Tensor:
        """Float32 logits [B, C, H, W] of same-size images, resized back if the val pipeline resized them."""
        ev = self.config.eval
        batch = torch.stack([self.preprocess(array) for array in arrays]).to(self.device)
        with torch.inference_mode():
            with self._precision.autocast():
                logits = predict_logits(self.model, batch, self.num_classes, mode=self.mode,
                                        crop_size=tuple(ev.crop_size), stride=tuple(ev.stride), flip=self.flip)
            size = arrays[0].shape[:2]
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        return logits

    def preprocess(self, array: np.ndarray) -> torch.Tensor:
        """An (H, W, channels) array as the model takes it: float32 [channels, H', W'] after ``augment.val`` and
        ``data.mean``/``std``, as validation prepared it."""
        return self._transform(image=pipeline_image(array, self.config.data.scale))["image"]

    @property
    def precision(self) -> Precision:
        """The run's inference precision (its ``autocast()`` context)."""
        return self._precision

    def _as_array(self, image: ImageInput) -> np.ndarray:
        """``image`` as an (H, W, channels) array as training read it; ValueError/TypeError if it cannot be."""
        if isinstance(image, (str, Path)):
            array = read_image(Path(image), self._channels)  # DataError naming the file if it is unfit
        elif isinstance(image, Image.Image):
            array = pil_array(image, self._channels)
            check_channels("PIL image", array.shape[2], self._channels)
        elif isinstance(image, np.ndarray):
            array = image
        else:
            raise TypeError(f"image must be a path, a PIL image or a NumPy array, got {type(image).__name__}")
        return self._checked(array)

    def _checked(self, array: np.ndarray) -> np.ndarray:
        """``array`` if it is (H, W, channels) numbers (uint8, uint16, float, or others with ``data.scale``);
        an (H, W) one repeated to 1 or 3 channels (grey to RGB)."""
        channels = self._channels
        fits = array.ndim == 3 and array.shape[2] == channels
        grey = array.ndim == 2 and channels in (1, 3)
        if array.dtype.kind not in "uif" or not (fits or grey) or 0 in array.shape:
            colour = "RGB" if channels == 3 else f"{channels} channels"
            extra = " or (H, W) greyscale" if channels in (1, 3) else ""
            raise ValueError(f"image must be a uint8/uint16/float array of shape (H, W, {channels}) {colour}{extra}, "
                             f"got {array.dtype} of shape {array.shape}")
        return np.repeat(array[..., None], channels, axis=2) if grey else array


def _batches(arrays: List[np.ndarray], batch_size: int) -> List[List[int]]:
    """Indices of ``arrays`` grouped by image size, in chunks of at most ``batch_size``."""
    by_size: Dict[Tuple[int, ...], List[int]] = {}
    for index, array in enumerate(arrays):
        by_size.setdefault(array.shape, []).append(index)
    return [group[start:start + batch_size] for group in by_size.values() for start in range(0, len(group), batch_size)]


def _as_config(config: ConfigInput) -> Config:
    return config if isinstance(config, Config) else load_config(config)


def _as_device(device: DeviceInput) -> torch.device:
    """``device``, or the GPU if CUDA is available, else the CPU (the run's ``device`` key says where it trained)."""
    return resolve_device("auto") if device is None else torch.device(device)
