"""The configuration as plain dataclasses: every key a run accepts, its type and default.

YAML files are turned into these objects once, at the edge (:func:`segfocal.config.load_config`);
the rest of the code reads attributes, never dictionaries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Union, get_args

from ..losses.class_weights import WEIGHT_SCHEMES
from ..losses.options import NORMALIZATIONS


@dataclass
class SyntheticConfig:
    """A generated, strongly imbalanced dataset written under ``data.root`` when missing."""

    num_train: int = 192
    num_val: int = 48
    num_test: int = 48
    image_size: int = 96
    seed: int = 0


@dataclass
class PatchesConfig:
    """``data.patches``: train on ``per_epoch`` crops of ``size`` [height, width] a pass, read from images of any
    size without decoding the rest (tiled TIFF, Zarr, ``.npy``; see :mod:`segfocal.data.patches`).

    Crop ``i`` of epoch ``e`` is drawn from ``(seed, e, i)`` alone. A ``rare_fraction`` of the crops is centred
    on a pixel of a class drawn with probability proportional to the ``class_weight`` scheme (a loss weight
    scheme) of the split's class frequencies, read from a class index of up to ``index_points`` pixel positions
    per class and image, built once and cached in ``index_dir`` (null: ``$SEGFOCAL_CACHE/class_index``, by
    default ``~/.cache/segfocal/class_index``). The val split is scored in tiles of ``size``. A header claiming
    more than ``max_pixels`` pixels is refused.
    """

    size: List[int] = field(default_factory=lambda: [256, 256])
    per_epoch: int = 1000
    rare_fraction: float = 0.0
    class_weight: str = "enet"
    index_points: int = 10000
    index_dir: Optional[str] = None
    max_pixels: int = 2 ** 36


@dataclass
class DataConfig:
    """Paired image/mask folders, matched by file stem.

    ``image_dir``/``mask_dir`` are relative to ``root``, with ``{split}`` replaced by the split
    name: ``{split}/images`` + ``{split}/masks`` for the synthetic set, ``{split}`` + ``{split}annot``
    for CamVid as downloaded. ``split_file``, when set, lists the stems (or "image mask" path pairs)
    of a split, one a line. ``layout`` other than ``folder`` finds the files where Cityscapes, Pascal
    VOC or ADE20K put them instead (``image_dir``/``mask_dir``/``split_file`` are then not used).

    Images have ``len(mean)`` = ``model.in_channels`` channels of any bit depth; a value ``x`` reaches
    the model as ``(x * scale - mean) / std``, ``scale`` null meaning the type's full range (1/255
    for 8-bit, 1/65535 for 16-bit, 1 for float images). ``label_map`` (stored value → train id, the
    values it leaves out → ``ignore_index``) or ``reduce_zero_label`` (0 → ignore, v → v - 1) turns
    stored mask values into train ids. ``val_fraction`` carves the val split from the train split
    (drawn with the run's seed, recorded in ``work_dir/val_split.json``).
    """

    root: str = "data/synthetic"
    num_classes: int = 6
    class_names: List[str] = field(default_factory=list)
    ignore_index: int = 255
    image_dir: str = "{split}/images"
    mask_dir: str = "{split}/masks"
    split_file: Optional[str] = None
    color_map: Optional[List[List[int]]] = None
    palette: Optional[List[List[int]]] = None  # [r, g, b] per class for masks and overlays; null: default
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    batch_size: int = 8
    num_workers: int = 2
    bad_samples: str = "error"
    verify: str = "header"
    synthetic: Optional[SyntheticConfig] = None
    layout: str = "folder"
    scale: Optional[float] = None
    label_map: Optional[Dict[int, int]] = None
    reduce_zero_label: bool = False
    val_fraction: Optional[float] = None
    patches: Optional[PatchesConfig] = None  # null: whole images; else crops read lazily (PatchesConfig)


@dataclass
class AugmentConfig:
    """Albumentations transforms in albumentations' own serialised form (``A.to_dict`` items).

    Normalisation with ``data.mean``/``data.std`` and conversion to tensors are appended by the
    data pipeline; masks are always resized nearest-neighbour.
    """

    train: List[Dict[str, Any]] = field(default_factory=list)
    val: List[Dict[str, Any]] = field(default_factory=list)


@dataclass
class ModelConfig:
    """A segmentation-models-pytorch model by name; ``encoder_weights`` is a local file or null."""

    arch: str = "Unet"
    encoder_name: str = "resnet18"
    encoder_weights: Optional[str] = None
    in_channels: int = 3
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LossTermConfig:
    """One term of ``loss.terms``: the loss ``name`` times ``weight`` (the term's factor in the sum).

    The options are those of the loss section, with the class weights named ``class_weight``;
    ``"auto"`` is each loss's own default: ENet weights for focal and cross-entropy, none for Dice.
    ``gamma`` to ``histogram_momentum`` apply to focal terms, ``smooth_nr`` to ``batch`` to Dice
    terms (:func:`segfocal.losses.dice_loss`); ``loss.enet_c``, ``effective_beta`` and
    ``sync_histogram`` apply to every term.
    """

    name: str = ""  # one of TERM_NAMES; no default, checked at load
    weight: float = 1.0
    class_weight: Union[str, List[float], None] = "auto"
    gamma: float = 2.0
    alpha: Union[float, List[float], None] = None
    normalize: str = "pixels"
    poly_epsilon: float = 0.0
    histogram_momentum: Optional[float] = None
    smooth_nr: float = 1e-5
    smooth_dr: float = 1e-5
    batch: bool = False


@dataclass
class LossConfig:
    """``focal`` (segfocal's loss) or ``cross_entropy`` (``F.cross_entropy``), with class weights;
    or, when ``terms`` is not empty, the weighted sum of its terms (``loss.name`` and the per-loss
    keys are then unused).

    ``sync_histogram``: under DistributedDataParallel, compute the on-the-fly weights from the
    label histogram of the global batch (summed over ranks), as one process would.
    ``histogram_momentum`` (focal only): weights from a running average of the batch histograms
    instead of each batch's own (e.g. 0.9), smoothing them across steps.
    """

    name: str = "focal"
    gamma: float = 2.0
    alpha: Union[float, List[float], None] = None
    weight: Union[str, List[float], None] = "enet"
    normalize: str = "pixels"
    poly_epsilon: float = 0.0
    enet_c: float = 1.10
    effective_beta: float = 0.9999
    sync_histogram: bool = True
    histogram_momentum: Optional[float] = None
    terms: List[LossTermConfig] = field(default_factory=list)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class ScheduleConfig:
    """Learning-rate schedule per optimiser step: ``poly``, ``cosine`` or ``constant``, after a linear warm-up."""

    name: str = "poly"
    warmup_iters: int = 0
    power: float = 0.9
    min_lr: float = 0.0


@dataclass
class EmaConfig:
    """``train.ema``: validate (and keep in ``best.pt``) an exponential moving average of the weights;
    ``warmup`` ramps the decay up over the first updates (see :mod:`segfocal.engine.ema`)."""

    decay: float = 0.999
    warmup: int = 10


@dataclass
class TrainConfig:
    """The loop, counted in ``epochs`` or, when ``iters`` is set, in optimiser steps (see
    :mod:`segfocal.engine.timeline`). ``find_unused_parameters`` is DistributedDataParallel's option: needed when part
    of the model gets no gradient, e.g. an smp encoder with ``encoder_depth < 5``."""

    epochs: int = 10
    iters: Optional[int] = None  # optimiser steps; when set, the run is counted in steps instead of epochs
    amp: str = "auto"
    channels_last: bool = True
    grad_clip: Optional[float] = None
    accumulate: int = 1
    val_every: int = 1  # in the run's unit: epochs, or steps when train.iters is set
    save_every: int = 1  # units between writes of last.pt (also written at the end and on a stop signal)
    log_every: int = 10
    log_images: int = 4
    log_image_size: int = 512  # longest side of the images logged to TensorBoard; 0: as they are
    max_log_mb: int = 1024  # warn once when the TensorBoard logs grow past this; 0: never
    checkpoint_metric: str = "miou"  # a SUMMARY_METRICS name, or "iou.<class name>" (any PER_CLASS_METRICS)
    patience: int = 0  # stop after this many validations without a new best checkpoint_metric; 0: never
    ema: Optional[EmaConfig] = None  # null: validate the trained weights themselves
    compile: bool = False  # torch.compile the model (checkpoints hold the plain module's weights)
    max_bad_steps: int = 10
    find_unused_parameters: bool = False


@dataclass
class EvalConfig:
    """Inference for validation and evaluation: ``whole`` image or ``slide`` window, optional flip TTA."""

    mode: str = "whole"
    crop_size: List[int] = field(default_factory=lambda: [512, 512])
    stride: List[int] = field(default_factory=lambda: [341, 341])
    flip: bool = False
    batch_size: int = 4


@dataclass
class Config:
    work_dir: str = "runs/default"
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Keys whose value must be one of a fixed set, checked when the config is loaded. Option names the
# code reads are Literal types, one tuple each for the checks here and in the modules that take them.
BadSamples = Literal["error", "skip"]
Verify = Literal["header", "full"]
Layout = Literal["folder", "cityscapes", "voc", "ade20k"]  # besides "folder": data/layouts.py FOLDERS
BAD_SAMPLE_MODES = get_args(BadSamples)
VERIFY_MODES = get_args(Verify)
LAYOUTS = get_args(Layout)

# What train.checkpoint_metric may name: a summary metric, or "<per-class metric>.<class name>"
# (e.g. "iou.Pedestrian"); every one is higher-is-better.
SUMMARY_METRICS = ("miou", "mean_accuracy", "mean_dice", "pixel_accuracy", "fwiou")
PER_CLASS_METRICS = ("iou", "accuracy", "dice")

# loss.terms[i].name, and the term options that only some of those losses take
TERM_NAMES = ("focal", "cross_entropy", "dice")
TERM_OPTIONS = {
    "gamma": ("focal",), "alpha": ("focal",), "normalize": ("focal",), "poly_epsilon": ("focal",),
    "histogram_momentum": ("focal",), "smooth_nr": ("dice",), "smooth_dr": ("dice",), "batch": ("dice",),
}
# loss.weight and loss.terms[i].class_weight: a scheme of WEIGHT_SCHEMES (imported from the losses, the one list)

CHOICES: Dict[str, tuple] = {
    "device": ("auto", "cpu", "cuda"),
    "data.bad_samples": BAD_SAMPLE_MODES,
    "data.verify": VERIFY_MODES,
    "data.layout": LAYOUTS,
    "loss.name": ("focal", "cross_entropy"),
    "loss.normalize": NORMALIZATIONS,
    "optim.name": ("adamw", "sgd"),
    "schedule.name": ("poly", "cosine", "constant"),
    "train.amp": ("auto", "bf16", "fp16", "fp32"),
    "eval.mode": ("whole", "slide"),
}
