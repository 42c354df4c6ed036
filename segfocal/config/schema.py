"""The configuration as pydantic models: every key a run accepts, its type, range, default and meaning.

YAML files are turned into these objects once, at the edge (:func:`segfocal.config.load_config`);
the rest of the code reads attributes, never dictionaries. A key's range is its ``Field``'s bounds,
a choice is a ``Literal``; checks that involve several keys are the models' ``after`` validators.
Each raises a ``ValueError`` whose text follows the key (``must be ...``); the loader adds the key,
the file and the value (:mod:`segfocal.config.errors`). The same models give the JSON Schema that
editors use (``segfocal config-schema``).
"""
from __future__ import annotations

import os
import string
from typing import Any, Dict, List, Literal, Optional, Sequence, Union, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from typing_extensions import Annotated

from ..losses.class_weights import WEIGHT_SCHEMES
from ..losses.options import Normalization
from ..losses.terms import TERM_LOSSES, takes


class Section(BaseModel):
    """A config section: unknown keys are errors, values are taken as YAML types them (no "3" for 3,
    no 1 for true) and floats must be finite."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_default=False)


NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
ClassValues = List[NonNegativeFloat]  # one finite value >= 0 per class (the count is checked by Config)


def _height_width(value: List[int]) -> List[int]:
    if len(value) != 2 or min(value) < 1:
        raise ValueError("must be [height, width] of positive ints")
    return value


def _split_pattern(pattern: Optional[str]) -> Optional[str]:
    """Folder and split-file patterns may use ``{split}`` and nothing else (a typo was a KeyError at start)."""
    if pattern is None:
        return None
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(pattern) if field is not None}
    except ValueError as error:  # an unmatched brace
        raise ValueError(f"must be a valid pattern ({error}); write {{split}} for the split name and {{{{ }}}} "
                         f"for a literal brace") from None
    unknown = sorted(fields - {"split"})
    if unknown:
        raise ValueError(f"must use no placeholder but {{split}} (the split's name), not {{{unknown[0]}}}")
    return pattern


HeightWidth = Annotated[List[int], AfterValidator(_height_width)]
# a folder the run reads or writes: "~/runs" is the home folder's, as in a shell, not a folder named "~" here
UserPath = Annotated[str, AfterValidator(os.path.expanduser)]
SplitPattern = Annotated[str, AfterValidator(_split_pattern)]
Colour = Annotated[List[Annotated[int, Field(ge=0, le=255)]], Field(min_length=3, max_length=3)]
ClassWeight = Union[Literal[WEIGHT_SCHEMES], ClassValues, None]  # type: ignore[valid-type]

# Keys whose value must be one of a fixed set. Option names the code reads are Literal types, one
# tuple each for the checks here and in the modules that take them.
BadSamples = Literal["error", "skip"]
Verify = Literal["header", "full"]
Layout = Literal["folder", "cityscapes", "voc", "ade20k"]  # besides "folder": data/layouts.py FOLDERS
BAD_SAMPLE_MODES = get_args(BadSamples)
VERIFY_MODES = get_args(Verify)
LAYOUTS = get_args(Layout)
TermName = Literal[tuple(TERM_LOSSES)]  # type: ignore[valid-type]

# What train.checkpoint_metric may name: a summary metric, or "<per-class metric>.<class name>"
# (e.g. "iou.Pedestrian"); every one is higher-is-better.
SUMMARY_METRICS = ("miou", "mean_accuracy", "mean_dice", "pixel_accuracy", "fwiou")
PER_CLASS_METRICS = ("iou", "accuracy", "dice")


def class_names(names: Optional[Sequence[str]], num_classes: int) -> List[str]:
    """``names``, or ``class_0 .. class_{C-1}`` when none are given: the labels of tables, plots and logs."""
    return list(names) if names else [f"class_{index}" for index in range(num_classes)]


class SyntheticConfig(Section):
    """A generated, strongly imbalanced dataset written under ``data.root`` when missing."""

    num_train: int = 192
    num_val: int = 48
    num_test: int = 48
    image_size: int = 96
    seed: int = 0


class PatchesConfig(Section):
    """``data.patches``: train on ``per_epoch`` crops of ``size`` [height, width] a pass, read from images of any
    size without decoding the rest (tiled TIFF, Zarr, ``.npy``; see :mod:`segfocal.data.patches`).

    Crop ``i`` of epoch ``e`` is drawn from ``(seed, e, i)`` alone. A ``rare_fraction`` of the crops is centred
    on a pixel of a class drawn with probability proportional to the ``class_weight`` scheme (a loss weight
    scheme) of the split's class frequencies, read from a class index of up to ``index_points`` pixel positions
    per class and image, built once and cached in ``index_dir`` (null: ``$SEGFOCAL_CACHE/class_index``, by
    default ``~/.cache/segfocal/class_index``). The val split is scored in tiles of ``size``. A header claiming
    more than ``max_pixels`` pixels is refused.
    """

    size: HeightWidth = Field(default_factory=lambda: [256, 256])
    per_epoch: PositiveInt = 1000
    rare_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0
    class_weight: Literal[WEIGHT_SCHEMES] = "enet"  # type: ignore[valid-type]
    index_points: PositiveInt = 10000
    index_dir: Optional[UserPath] = None
    max_pixels: PositiveInt = 2 ** 36


class DataConfig(Section):
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

    root: UserPath = "data/synthetic"
    num_classes: PositiveInt = 6
    class_names: List[str] = Field(default_factory=list, description="one name per class; empty: class_0, ...")
    ignore_index: int = 255
    image_dir: SplitPattern = "{split}/images"
    mask_dir: SplitPattern = "{split}/masks"
    split_file: Optional[SplitPattern] = None
    color_map: Optional[List[Colour]] = Field(None, description="[r, g, b] of each class in RGB-coded masks")
    palette: Optional[List[Colour]] = Field(None, description="[r, g, b] per class for masks and overlays; "
                                                              "null: the default palette")
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    mean: List[float] = Field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = Field(default_factory=lambda: [0.229, 0.224, 0.225])
    batch_size: PositiveInt = 8
    num_workers: NonNegativeInt = 2
    bad_samples: BadSamples = "error"
    verify: Verify = "header"
    synthetic: Optional[SyntheticConfig] = None
    layout: Layout = "folder"
    scale: Optional[Annotated[float, Field(gt=0)]] = Field(None, description="null: the type's full range")
    label_map: Optional[Dict[NonNegativeInt, int]] = Field(None, description="stored mask value -> train id")
    reduce_zero_label: bool = False
    val_fraction: Optional[Annotated[float, Field(gt=0, lt=1)]] = None
    patches: Optional[PatchesConfig] = Field(None, description="null: whole images; else crops read lazily")

    @model_validator(mode="after")
    def _consistent(self) -> "DataConfig":
        if self.label_map is not None and self.reduce_zero_label:
            raise ValueError("data.label_map and data.reduce_zero_label are both set; use one (list the shifted "
                             "ids in data.label_map)")
        for key, value in (self.label_map or {}).items():
            if not (0 <= value < self.num_classes or value == self.ignore_index):
                raise ValueError(f"data.label_map[{key!r}]={value!r}: a train id must be a class 0.."
                                 f"{self.num_classes - 1} (data.num_classes={self.num_classes}) or "
                                 f"data.ignore_index={self.ignore_index}")
        if self.val_fraction is not None and self.val_split == self.train_split:
            raise ValueError(f"data.val_fraction={self.val_fraction!r} needs data.val_split (the carved part, "
                             f"{self.val_split!r}) named apart from data.train_split")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"data.class_names has {len(self.class_names)} names for "
                             f"data.num_classes={self.num_classes}")
        if self.palette is not None and len(self.palette) != self.num_classes:
            raise ValueError(f"data.palette has {len(self.palette)} colours for data.num_classes={self.num_classes}")
        if self.layout != "folder":
            for key in ("image_dir", "mask_dir", "split_file"):
                if getattr(self, key) != DataConfig.model_fields[key].default:
                    raise ValueError(f"data.{key}={getattr(self, key)!r} is not used with data.layout="
                                     f"{self.layout!r}, which knows where its files are; remove data.{key}")
        return self


class AugmentConfig(Section):
    """Albumentations transforms in albumentations' own serialised form (``A.to_dict`` items).

    Normalisation with ``data.mean``/``data.std`` and conversion to tensors are appended by the
    data pipeline; masks are always resized nearest-neighbour.
    """

    train: List[Dict[str, Any]] = Field(default_factory=list)
    val: List[Dict[str, Any]] = Field(default_factory=list)


class ModelConfig(Section):
    """A segmentation-models-pytorch model by name; ``encoder_weights`` is a local state-dict file, the
    name of weights smp lists for the encoder (downloaded by smp when asked for), or null."""

    arch: str = "Unet"
    encoder_name: str = "resnet18"
    encoder_weights: Optional[str] = None
    in_channels: PositiveInt = 3
    kwargs: Dict[str, Any] = Field(default_factory=dict, description="more keyword arguments of the smp model")


class _LossOptions(Section):
    """The options a loss section and a loss term share."""

    gamma: NonNegativeFloat = 2.0
    alpha: Union[Annotated[float, Field(ge=0, le=1)], ClassValues, None] = Field(
        None, description="a float (class 0 gets alpha, the others 1 - alpha), one value per class, or null")
    normalize: Normalization = "pixels"
    poly_epsilon: float = 0.0
    histogram_momentum: Optional[Fraction] = Field(None, description="focal only: weights from a running "
                                                                     "average of the batch histograms")


class LossTermConfig(_LossOptions):
    """One term of ``loss.terms``: the loss ``name`` times ``weight`` (the term's factor in the sum).

    The options are those of the loss section, with the class weights named ``class_weight``;
    ``"auto"`` is each loss's own default: ENet weights for focal and cross-entropy, none for Dice.
    ``gamma`` to ``histogram_momentum`` apply to focal terms, ``smooth_nr`` to ``batch`` to Dice
    terms (:func:`segfocal.losses.dice_loss`); ``loss.enet_c``, ``effective_beta`` and
    ``sync_histogram`` apply to every term.
    """

    name: TermName
    weight: NonNegativeFloat = 1.0
    class_weight: Union[Literal[WEIGHT_SCHEMES + ("auto",)], ClassValues, None] = "auto"  # type: ignore[valid-type]
    smooth_nr: NonNegativeFloat = 1e-5
    smooth_dr: Annotated[float, Field(gt=0, description="a sample without counted pixels divides by it")] = 1e-5
    batch: bool = False


# the term options that only some losses take, and those losses: the ones whose constructor has the keyword
TERM_OPTIONS = {key: tuple(name for name in TERM_LOSSES if takes(name, key))
                for key in LossTermConfig.model_fields if key not in ("name", "weight", "class_weight")}


class LossConfig(_LossOptions):
    """``focal`` (segfocal's loss) or ``cross_entropy`` (``F.cross_entropy``), with class weights;
    or, when ``terms`` is not empty, the weighted sum of its terms (``loss.name`` and the per-loss
    keys are then unused).

    ``sync_histogram``: under DistributedDataParallel, compute the on-the-fly weights from the
    label histogram of the global batch (summed over ranks), as one process would.
    """

    name: Literal["focal", "cross_entropy"] = "focal"
    weight: ClassWeight = "enet"
    enet_c: Annotated[float, Field(gt=1, description="w = 1 / ln(c + f) must stay finite and positive")] = 1.10
    effective_beta: Annotated[float, Field(gt=0, lt=1)] = 0.9999
    sync_histogram: bool = True
    terms: List[LossTermConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "LossConfig":
        for index, term in enumerate(self.terms):
            for key, owners in TERM_OPTIONS.items():
                value = getattr(term, key)
                if term.name not in owners and value != LossTermConfig.model_fields[key].default:
                    raise ValueError(f"loss.terms[{index}].{key}={value!r} applies to {' and '.join(owners)} terms "
                                     f"only, and this term is {term.name}")
        if self.terms and not any(term.weight > 0 for term in self.terms):
            raise ValueError("loss.terms: every term has weight 0, so nothing would be trained")
        return self


class OptimConfig(Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: NonNegativeFloat = 1e-4
    momentum: Fraction = 0.9
    betas: Annotated[List[Fraction], Field(min_length=2, max_length=2)] = Field(default_factory=lambda: [0.9, 0.999])


class ScheduleConfig(Section):
    """Learning-rate schedule per optimiser step: ``poly``, ``cosine`` or ``constant``, after a linear warm-up."""

    name: Literal["poly", "cosine", "constant"] = "poly"
    warmup_iters: NonNegativeInt = 0
    power: NonNegativeFloat = 0.9
    min_lr: NonNegativeFloat = 0.0


class EmaConfig(Section):
    """``train.ema``: validate (and keep in ``best.pt``) an exponential moving average of the weights;
    ``warmup`` ramps the decay up over the first updates (see :mod:`segfocal.engine.ema`)."""

    decay: Fraction = 0.999
    warmup: NonNegativeInt = 10


class TrainConfig(Section):
    """The loop, counted in ``epochs`` or, when ``iters`` is set, in optimiser steps (see
    :mod:`segfocal.engine.timeline`). ``find_unused_parameters`` is DistributedDataParallel's option: needed when part
    of the model gets no gradient, e.g. an smp encoder with ``encoder_depth < 5``."""

    epochs: NonNegativeInt = 10
    iters: Optional[PositiveInt] = Field(None, description="optimiser steps; when set, the run is counted in "
                                                           "steps instead of epochs")
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    channels_last: bool = True
    grad_clip: Optional[Annotated[float, Field(gt=0)]] = Field(None, description="null: no clipping")
    accumulate: PositiveInt = 1
    val_every: PositiveInt = Field(1, description="in the run's unit: epochs, or steps when train.iters is set")
    save_every: PositiveInt = Field(1, description="units between writes of last.pt (also written at the end "
                                                   "and on a stop signal)")
    log_every: PositiveInt = 10
    log_images: NonNegativeInt = 4
    log_image_size: NonNegativeInt = Field(512, description="longest side of the images logged to TensorBoard; "
                                                            "0: as they are")
    max_log_mb: NonNegativeInt = Field(1024, description="warn once when the TensorBoard logs grow past this; 0: never")
    checkpoint_metric: str = Field("miou", description="a summary metric, or 'iou.<class name>' (also accuracy, dice)")
    patience: NonNegativeInt = Field(0, description="stop after this many validations without a new best "
                                                    "checkpoint_metric; 0: never")
    ema: Optional[EmaConfig] = Field(None, description="null: validate the trained weights themselves")
    compile: bool = Field(False, description="torch.compile the model (checkpoints hold the plain module's weights)")
    max_bad_steps: NonNegativeInt = 10
    calibrate: bool = Field(False, description="after training, fit a per-class decision calibration of best.pt "
                                               "on the val split for checkpoint_metric, and store it in best.pt")
    find_unused_parameters: bool = False


class EvalConfig(Section):
    """Inference for validation and evaluation: ``whole`` image or ``slide`` window, optional flip TTA."""

    mode: Literal["whole", "slide"] = "whole"
    crop_size: HeightWidth = Field(default_factory=lambda: [512, 512])
    stride: HeightWidth = Field(default_factory=lambda: [341, 341])
    flip: bool = False
    batch_size: PositiveInt = 4

    @model_validator(mode="after")
    def _windows_cover(self) -> "EvalConfig":
        # checked whatever the mode: --mode slide on the command line uses these
        if any(step > size for step, size in zip(self.stride, self.crop_size)):
            raise ValueError(f"eval.stride={list(self.stride)} exceeds eval.crop_size={list(self.crop_size)}: the "
                             f"sliding windows would leave pixels between them unscored; lower eval.stride")
        return self


class Config(Section):
    work_dir: UserPath = "runs/default"
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        data, loss = self.data, self.loss
        for key in ("mean", "std"):
            if len(getattr(data, key)) != self.model.in_channels:
                raise ValueError(f"data.{key} needs one value per input channel (model.in_channels="
                                 f"{self.model.in_channels}), got {getattr(data, key)}")
        if self.schedule.min_lr > self.optim.lr:
            raise ValueError(f"schedule.min_lr must be in [0, optim.lr], got {self.schedule.min_lr!r}")
        per_class = [("loss.weight", loss.weight), ("loss.alpha", loss.alpha)]
        for index, term in enumerate(loss.terms):
            per_class += [(f"loss.terms[{index}].class_weight", term.class_weight), (f"loss.terms[{index}].alpha",
                                                                                     term.alpha)]
        for key, values in per_class:
            if isinstance(values, list) and len(values) != data.num_classes:
                raise ValueError(f"{key} must be one finite value >= 0 per class (data.num_classes="
                                 f"{data.num_classes}), got {values!r}")
        check_metric_name(self.train.checkpoint_metric, class_names(data.class_names, data.num_classes))
        return self


def check_metric_name(metric: str, names: Sequence[str], key: str = "train.checkpoint_metric") -> None:
    """Raise ``ValueError`` naming ``key`` unless ``metric`` is one validation reports: a summary metric,
    or one class's (in ``names``) per-class metric as ``"iou.<class name>"``."""
    kind, _, name = metric.partition(".")
    if metric in SUMMARY_METRICS or (kind in PER_CLASS_METRICS and name in names):
        return
    if kind in PER_CLASS_METRICS and name:
        raise ValueError(f"{key}={metric!r}: no class {name!r}; the classes are {', '.join(names)}")
    raise ValueError(f"{key}={metric!r} is not a metric; choose one of {', '.join(SUMMARY_METRICS)}, or one "
                     f"class's {'/'.join(PER_CLASS_METRICS)} as 'iou.<class name>'")
