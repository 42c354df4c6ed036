"""Export a trained model so it can run outside segfocal: ONNX, a ``torch.export`` program, or an smp folder.

Every exporter

* puts ``model`` in eval mode (in place) and exports an eval-mode, float32, CPU, contiguous
  version of it (a copy when the model is on a GPU, in another dtype, or channels_last);
* stages its files in a hidden temporary beside the target and moves them into place only
  after they were written completely (and verified), so a failure leaves the target as it was;
* writes an smp folder only where it holds nothing but an earlier smp export, unless told to
  overwrite (:func:`check_output`, which ``segfocal export`` calls before the model loads);
* with ``verify=True`` (the default) loads the artefact back with its own runtime and compares
  its logits with the PyTorch model's on two inputs, the example ``[2, C, H, W]`` and a
  ``[1, C, H + s, W + 2s]`` one (``s``: the least multiple of 32 and the model's size divisor), so a
  batch, height or width fixed by mistake, or a graph right only at the traced size, is caught
  (``[1, C, H, W]`` for an ONNX export with a fixed size). They must agree within
  ``tolerance * max(1, max |logit|)`` (float32 kernels of two runtimes differ by ~1e-5),
  else :class:`ExportError` is raised and nothing is written;
* returns the paths it wrote.

Inputs are float32 ``[N, C, H, W]`` images, already normalised like the training data (the
config's ``data.mean``/``data.std``); outputs are logits ``[N, num_classes, H, W]``.

ONNX needs the ``export`` extra (``pip install segfocal[export]``: onnx, onnxscript,
onnxruntime); the other formats need only torch and segmentation-models-pytorch.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import itertools
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .config import Config
from .engine.restore import restore_with_config
from .evaluation.inference import model_size_divisor, unwrap_model
from .files import mode_for, replaced_atomically

PathLike = Union[str, Path]

#: Installs what :func:`export_onnx` needs.
EXPORT_EXTRA = "pip install 'segfocal[export]'"
#: The ONNX graph's input and output names.
ONNX_INPUT, ONNX_OUTPUT = "image", "logits"
#: ``tolerance`` default: the largest ``max |difference|`` accepted per unit of ``max(1, max |logit|)``.
TOLERANCE = 1e-4

__all__ = [
    "ExportError", "TOLERANCE", "EXPORT_EXTRA", "ONNX_INPUT", "ONNX_OUTPUT", "SMP_FILES",
    "model_from_checkpoint", "export_onnx", "export_pt2", "export_smp", "check_output", "output_files",
]

#: The files smp's ``save_pretrained`` writes into an smp export's folder.
SMP_FILES = ("config.json", "model.safetensors", "README.md")


class ExportError(RuntimeError):
    """A model cannot be exported, a package the format needs is missing, or the artefact differs from the model."""


def model_from_checkpoint(checkpoint: PathLike, config: Optional[Config] = None,
                          device: Union[str, torch.device] = "cpu",
                          contents: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Config]:
    """The model of a checkpoint and its config (the one the trainer saved in it, unless ``config`` is
    given; a bare state dict needs it), in eval mode and contiguous memory format (whatever
    ``train.channels_last`` says), for export. ``contents``: the checkpoint already read."""
    cfg, model = restore_with_config(checkpoint, torch.device(device), config, contents)
    return model.to(memory_format=torch.contiguous_format).eval(), cfg


def export_onnx(
    model: nn.Module,
    path: PathLike,
    in_channels: Optional[int] = None,
    example_size: Tuple[int, int] = (256, 256),
    opset: Optional[int] = None,
    *,
    dynamic_size: bool = True,
    verify: bool = True,
    tolerance: float = TOLERANCE,
    metadata: Optional[Dict[str, str]] = None,
    overwrite: bool = False,
) -> List[Path]:
    """Write ``model`` as an ONNX file with dynamic batch, height and width; returns the files written.

    The graph has one input ``image`` (float32 ``[batch, in_channels, height, width]``) and one
    output ``logits`` (``[batch, classes, height, width]``). ``dynamic_size=False`` fixes height
    and width to ``example_size`` (the batch stays dynamic): needed for architectures with
    adaptive pooling (smp's PSPNet, UPerNet), whose ONNX graph is right only at the traced size;
    the verification at a second size detects them. It is made by torch's
    ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``), the default and
    recommended one since torch 2.9; the TorchScript-based one is deprecated. ``opset=None``
    takes torch's default opset (20 in torch 2.14). A model whose weights exceed 2 GB gets
    them in a second file, ``<name>.data``, beside ``path`` (ONNX files cannot hold more).

    ``in_channels=None`` asks the model (its smp config, else its first convolution).
    ``example_size`` is the (height, width) traced; each must be a multiple of the model's size
    divisor and larger than its encoder's output stride. ``metadata`` (str -> str) goes into the
    model's metadata properties, e.g. the class names and the normalisation to apply. An existing
    file at ``path`` not named ``.onnx`` is replaced only with ``overwrite`` (:func:`check_output`).
    Needs onnx and onnxscript, plus onnxruntime to verify (``pip install segfocal[export]``).
    """
    _require("ONNX export", ("onnx", "onnxscript") + (("onnxruntime",) if verify else ()))
    _require_dynamic_dims()
    path = Path(path)
    check_output("onnx", path, overwrite)
    model = _prepared(model)
    channels = _in_channels(model, in_channels)
    example, inputs = _example_inputs(model, channels, example_size, vary_size=dynamic_size)
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    try:
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
            dynamic_shapes=(axes,), opset_version=opset, verbose=False,
        )
    except Exception as error:  # torch.export and the ONNX translation raise many types
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {_first_line(error)}") from error
    if metadata:
        program.model.metadata_props.update({str(key): str(value) for key, value in metadata.items()})
    with _staging(path.parent, path.name) as stage:
        try:
            program.save(stage / path.name)  # weights over 2 GB go to a second file beside it
        except Exception as error:
            raise ExportError(f"cannot write {path}: {_first_line(error)}") from error
        if verify:
            hint = (" but matches at the example size: the graph holds only at the traced size (adaptive pooling "
                    "does this); export with a fixed size (dynamic_size=False)") if dynamic_size else ""
            _verify_onnx(model, stage / path.name, inputs, tolerance, path, hint)
        return _publish(stage, path.parent, last=path.name)


def export_pt2(
    model: nn.Module,
    path: PathLike,
    example_size: Tuple[int, int] = (256, 256),
    *,
    in_channels: Optional[int] = None,
    verify: bool = True,
    tolerance: float = TOLERANCE,
    overwrite: bool = False,
) -> List[Path]:
    """Write ``model`` as a ``torch.export`` program (``.pt2``) with dynamic batch, height and width.

    Load it with plain torch, no segfocal or smp needed::

        model = torch.export.load(path).module()   # then model(images) -> logits

    This is torch's supported way to save a model as a program; TorchScript is deprecated
    (torch 2.14's ``torch.jit.trace``/``script``/``load`` raise a FutureWarning saying so). Batch, height and
    width are ``Dim.DYNAMIC``: torch infers their valid ranges from the model. The program
    accepts what the model accepts (for smp 0.6's Unet any size; for other architectures
    multiples of 32), provided each side is larger than the encoder's output stride (> 32 for a
    5-stage encoder): torch.export assumes no feature map is 1 pixel wide, and the program's
    shape guard rejects smaller inputs with an AssertionError. Arguments as in :func:`export_onnx`.
    """
    _require_dynamic_dims()
    path = Path(path)
    check_output("pt2", path, overwrite)
    model = _prepared(model)
    channels = _in_channels(model, in_channels)
    example, inputs = _example_inputs(model, channels, example_size)
    dynamic = torch.export.Dim.DYNAMIC
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},),
                                      strict=False)
    except Exception as error:  # torch.export raises many types
        raise ExportError(f"torch.export of {type(model).__name__} failed: {_first_line(error)}") from error
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    data = buffer.getvalue()
    if verify:
        loaded = torch.export.load(io.BytesIO(data)).module()
        _verify(f"torch.export program {path}", lambda images: loaded(images), model, inputs, tolerance)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as handle:
        handle.write(data)
    return [path]


def export_smp(
    model: nn.Module,
    directory: PathLike,
    *,
    verify: bool = True,
    tolerance: float = TOLERANCE,
    example_size: Tuple[int, int] = (256, 256),
    overwrite: bool = False,
) -> List[Path]:
    """Save an smp model with its ``save_pretrained``: ``config.json``, ``model.safetensors``, ``README.md``.

    ``segmentation_models_pytorch.from_pretrained(directory)`` rebuilds it (no segfocal needed).
    The model must carry the init config that smp's hub mixin records when a model is built
    (``smp.create_model`` or ``smp.Unet(...)``, as :func:`segfocal.models.build_model` does).
    ``encoder_weights`` is saved as null: the weights are all in ``model.safetensors``, and a
    name such as "imagenet" would make ``from_pretrained`` download them. ``directory`` must be
    new, empty or an earlier smp export (the three files, an smp ``config.json``); with
    ``overwrite=True`` it may hold other files, which are left alone. The three are replaced one
    by one, ``config.json`` last. ``example_size`` is the (height, width) of the verification inputs.
    """
    directory = Path(directory)
    check_output("smp", directory, overwrite)
    model = _prepared(model)
    config = getattr(model, "config", None)
    if not callable(getattr(model, "save_pretrained", None)) or not isinstance(config, dict) or not config:
        raise ExportError(f"{type(model).__name__} is not a segmentation-models-pytorch model with a recorded "
                          f"init config (build it with smp.create_model or segfocal.models.build_model)")
    weights = config.get("encoder_weights")
    with _staging(directory.parent, directory.name) as stage:
        config["encoder_weights"] = None
        try:
            model.save_pretrained(stage)
        except Exception as error:
            raise ExportError(f"cannot save {type(model).__name__} to {directory}: {_first_line(error)}") from error
        finally:
            config["encoder_weights"] = weights
        if verify:
            import segmentation_models_pytorch as smp

            with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loading weights from local directory"
                loaded = smp.from_pretrained(str(stage)).eval()
            _, inputs = _example_inputs(model, _in_channels(model, None), example_size)
            _verify(f"smp folder {directory}", loaded, model, inputs, tolerance)
        directory.mkdir(parents=True, exist_ok=True)
        return _publish(stage, directory, last="config.json")


def output_files(fmt: str, output: PathLike) -> List[Path]:
    """The files an export in format ``fmt`` ("onnx", "pt2" or "smp") to ``output`` may write.

    ONNX: the file and ``<name>.data``, where weights over 2 GB go; smp: :data:`SMP_FILES` in the folder.
    """
    output = Path(output)
    if fmt == "smp":
        return [output / name for name in SMP_FILES]
    return [output, output.with_name(output.name + ".data")] if fmt == "onnx" else [output]


def check_output(fmt: str, output: PathLike, overwrite: bool = False) -> None:
    """Raise :class:`ExportError` unless an export in format ``fmt`` may write to ``output``.

    A file format needs a path that is not a folder, and that is new or named for the format
    (``.onnx``, ``.pt2``: an earlier export, replaced); ``overwrite`` allows any other existing file.
    An smp export needs a folder that does not exist, is empty, or holds an earlier smp export and
    nothing else (a ``config.json`` that smp wrote, with the other two files at most); ``overwrite``
    allows a folder holding other files (they are kept; only the three are replaced). Cheap: reads
    names and one small JSON file.
    """
    output = Path(output)
    if fmt != "smp":
        if output.is_dir():
            raise ExportError(f"{output} is a directory; give a file path")
        if output.exists() and output.suffix.lower() != f".{fmt}" and not overwrite:
            raise ExportError(f"{output} exists and is not a .{fmt} file (an earlier export): give a new path, or "
                              f"pass --overwrite to replace it")
        return
    if output.exists() and not output.is_dir():
        raise ExportError(f"{output} exists and is not a directory; give a folder for the smp export")
    if overwrite or not output.is_dir():
        return
    names = sorted(entry.name for entry in output.iterdir())
    if names and not (set(names) <= set(SMP_FILES) and _is_smp_config(output / "config.json")):
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ExportError(f"{output} holds files an smp export did not write ({shown}); export to a new or empty "
                          f"folder, or pass --overwrite to replace {', '.join(SMP_FILES)} there (other files are kept)")


def _is_smp_config(path: Path) -> bool:
    """Whether ``path`` is a ``config.json`` that smp's ``save_pretrained`` wrote (it records the model class)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("_model_class"), str)


# --- helpers ---------------------------------------------------------------------------------------------


def _require(what: str, modules: Sequence[str]) -> None:
    """Raise :class:`ExportError` naming the extra to install unless every module imports."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"{what} needs {', '.join(modules)}; missing: {', '.join(missing)}. "
                          f"Install them with: {EXPORT_EXTRA}")


def _require_dynamic_dims() -> None:
    if getattr(getattr(torch, "export", None), "Dim", None) is None or not hasattr(torch.export.Dim, "DYNAMIC"):
        raise ExportError(f"ONNX and torch.export exports need torch.export.Dim.DYNAMIC (torch 2.6 or newer; "
                          f"tested with 2.14); this is torch {torch.__version__}")


def _prepared(model: nn.Module) -> nn.Module:
    """``model`` (unwrapped from DDP/DataParallel/torch.compile) in eval mode, as float32 on the CPU, contiguous.

    The model itself is put in eval mode; a copy is made only if it must be moved or converted.
    """
    model = unwrap_model(model)
    model.eval()
    tensors = itertools.chain(model.parameters(), model.buffers())
    if any(tensor.device.type != "cpu" or not tensor.is_contiguous()
           or (tensor.is_floating_point() and tensor.dtype != torch.float32) for tensor in tensors):
        model = copy.deepcopy(model).to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()
    return model


def _in_channels(model: nn.Module, in_channels: Optional[int]) -> int:
    if in_channels is not None:
        return int(in_channels)
    config = getattr(model, "config", None)
    if isinstance(config, dict) and isinstance(config.get("in_channels"), int):
        return config["in_channels"]
    conv = next((module for module in model.modules() if isinstance(module, nn.Conv2d)), None)
    if conv is None:
        raise ExportError(f"cannot tell how many input channels {type(model).__name__} takes; pass in_channels")
    return conv.in_channels


def _example_inputs(model: nn.Module, channels: int, example_size: Sequence[int],
                    vary_size: bool = True) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The traced example ``[2, C, H, W]`` and the verification inputs: it and one of batch 1, larger if ``vary_size``.

    Batch 2, since torch.export specialises a dimension traced at size 1 to a constant.
    """
    size = tuple(example_size) if not isinstance(example_size, int) else (example_size, example_size)
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ValueError(f"example_size must be (height, width) of positive ints, got {example_size!r}")
    divisor = model_size_divisor(model)
    stride = getattr(getattr(model, "encoder", None), "output_stride", None)
    if any(v % divisor for v in size):
        raise ValueError(f"example_size {size} must be multiples of {divisor}, the model's size divisor")
    if isinstance(stride, int) and min(size) <= stride:
        raise ValueError(f"example_size {size} must exceed the encoder's output stride {stride} in each dimension "
                         f"(torch.export fixes a feature map traced at 1 pixel); try {(2 * stride, 2 * stride)}")
    step = math.lcm(divisor, 32) if vary_size else 0
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, channels, *size, generator=generator)
    other = torch.randn(1, channels, size[0] + step, size[1] + 2 * step, generator=generator)
    return example, [example, other]


def _verify(name: str, run, model: nn.Module, inputs: Sequence[torch.Tensor], tolerance: float,
            other_size_hint: str = "") -> None:
    """Raise :class:`ExportError` unless ``run(x)`` matches ``model(x)`` on every input.

    ``other_size_hint`` is added when an input of another height or width than the first fails.
    """
    for images in inputs:
        shape = tuple(images.shape)
        hint = other_size_hint if shape[2:] != tuple(inputs[0].shape[2:]) else ""
        with torch.no_grad():
            try:
                expected = model(images).float()
            except Exception as error:
                raise ExportError(f"the PyTorch model fails on an input of shape {shape}: {_first_line(error)}; "
                                  f"choose another example_size") from error
            try:
                got = torch.as_tensor(run(images)).float()
            except Exception as error:
                raise ExportError(f"{name} fails on an input of shape {shape}{hint}: {_first_line(error)}; "
                                  f"nothing was written") from error
        if got.shape != expected.shape:
            raise ExportError(f"{name}: output shape {tuple(got.shape)} for an input of shape {shape}, but the "
                              f"PyTorch model gives {tuple(expected.shape)}{hint}; nothing was written")
        difference = float((got - expected).abs().max())
        allowed = tolerance * max(1.0, float(expected.abs().max()))
        if not difference <= allowed:  # also catches NaN
            raise ExportError(f"{name}: logits differ from the PyTorch model's by up to {difference:.3g} (allowed "
                              f"{allowed:.3g}) for an input of shape {shape}{hint}; nothing was written")


def _verify_onnx(model: nn.Module, file: Path, inputs: Sequence[torch.Tensor], tolerance: float, target: Path,
                 other_size_hint: str) -> None:
    import onnxruntime

    try:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4  # its errors are raised as ExportError, not logged as well
        session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ExportError(f"ONNX model {target}: onnxruntime cannot load it: {_first_line(error)}") from error

    def run(images: torch.Tensor):
        return torch.from_numpy(session.run([ONNX_OUTPUT], {ONNX_INPUT: images.numpy()})[0])

    _verify(f"ONNX model {target}", run, model, inputs, tolerance, other_size_hint)


@contextlib.contextmanager
def _staging(parent: Path, name: str) -> Iterator[Path]:
    """A hidden temporary folder in ``parent`` (same file system, so ``os.replace`` out of it is atomic)."""
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp"))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _publish(stage: Path, destination: Path, last: str) -> List[Path]:
    """Move every file of ``stage`` into ``destination``, ``last`` last (what a reader opens first), each with
    the mode of the file it replaces or of a new file (safetensors writes its file owner-only)."""
    files = sorted(stage.iterdir(), key=lambda file: (file.name == last, file.name))
    for file in files:
        os.chmod(file, mode_for(destination / file.name))
        os.replace(file, destination / file.name)
    return [destination / file.name for file in files]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
