"""Model factory: smp architectures by name, encoder weights from a local file only."""
import pytest
import torch

from segfocal.config import ConfigError, ModelConfig
from segfocal.models import build_model

SMALL = dict(encoder_depth=3, decoder_channels=[16, 8, 4])


def test_any_smp_architecture_by_name():
    for arch, kwargs in (("Unet", SMALL), ("FPN", {}), ("Linknet", {"encoder_depth": 3})):
        model = build_model(ModelConfig(arch=arch, kwargs=kwargs), num_classes=7).eval()
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7, 64, 64)


def test_encoder_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    source = build_model(ModelConfig(kwargs=SMALL), num_classes=3)
    path = tmp_path / "encoder.pth"
    torch.save({"state_dict": source.encoder.state_dict()}, path)  # nested, as many published files are
    torch.manual_seed(1)
    model = build_model(ModelConfig(encoder_weights=str(path), kwargs=SMALL), num_classes=3)
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    fresh = build_model(ModelConfig(kwargs=SMALL), num_classes=3)
    assert not torch.equal(fresh.encoder.conv1.weight, source.encoder.conv1.weight)


def test_missing_or_foreign_weight_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"encoder_weights: file not found: .*nope.pth \(a path names a local "
                                          r"state-dict file; a name smp knows"):
        build_model(ModelConfig(encoder_weights=str(tmp_path / "nope.pth")), num_classes=3)
    torch.save({"something": torch.zeros(3)}, tmp_path / "foreign.pth")
    with pytest.raises(ConfigError, match="holds no tensor of encoder"):
        build_model(ModelConfig(encoder_weights=str(tmp_path / "foreign.pth"), kwargs=SMALL), num_classes=3)


def test_unknown_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="arch='Unett'"):
        build_model(ModelConfig(arch="Unett"), num_classes=3)
