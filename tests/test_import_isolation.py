"""``import segfocal.losses`` needs torch alone: no training/data/logging dependencies are pulled in."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

HEAVY = ("albumentations", "segmentation_models_pytorch", "tensorboard", "cv2", "yaml")

# run in a fresh interpreter: this test process has imported whatever other tests needed
_PROBE = """
import json, sys
import segfocal.losses
from segfocal.losses import DiceLoss, FocalLoss, class_weights, dice_loss, focal_loss
print(json.dumps({"loaded": sorted(m for m in HEAVY if m in sys.modules), "torch": "torch" in sys.modules}))
""".replace("HEAVY", repr(HEAVY))


def _probe(prefix: str = "") -> dict:
    result = subprocess.run([sys.executable, "-c", prefix + _PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_losses_import_pulls_in_no_heavy_dependency():
    report = _probe()
    assert report["torch"]
    assert report["loaded"] == [], f"import segfocal.losses imported {report['loaded']}"


@pytest.mark.skipif(importlib.util.find_spec("yaml") is None, reason="pyyaml is not installed")
def test_probe_detects_a_heavy_import():
    """Control: the probe does report a listed module once something imports it."""
    assert _probe("import yaml\n")["loaded"] == ["yaml"]
