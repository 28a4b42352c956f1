"""torchvision's ResNets as the image tower's CNN: the same architecture (parameter counts) and,
from torchvision-format weights, the same grid features as torchvision's own model (oracle)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from vtfusion.models.config import RESNETS, ModelConfig, VisionConfig
from vtfusion.models.vision import VisionTower, load_torchvision_weights


def _cnn_params(tower: VisionTower) -> int:
    return sum(p.numel() for n, p in tower.named_parameters() if n.startswith(("stem.", "stages.")))


@pytest.mark.parametrize("name", sorted(RESNETS))
def test_presets_have_torchvisions_parameter_count(name):
    ref = getattr(torchvision.models, name)(weights=None)
    without_classifier = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("fc."))
    assert _cnn_params(VisionTower(VisionConfig.resnet(name, image_size=64))) == without_classifier


@pytest.mark.parametrize("name,suffix", [("resnet18", ".pth"), ("resnet50", ".safetensors")])
def test_torchvision_weights_give_torchvisions_features(tmp_path, name, suffix):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)(weights=None).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a mapping slip shows
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"{name}{suffix}"
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    torch.save(sd, path) if suffix == ".pth" else save_file(sd, str(path))
    tower = VisionTower(VisionConfig.resnet(name, image_size=64)).eval()
    load_torchvision_weights(tower, path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
        got = tower.stages(tower.stem(x))
        assert torch.equal(got, want)
        assert tower(x).shape == (2, VisionConfig.resnet(name, image_size=64).num_tokens, tower.cfg.width)


def test_weights_that_do_not_fit_are_refused_with_the_keys(tmp_path):
    sd = torchvision.models.resnet18(weights=None).state_dict()
    sd.pop("layer1.0.conv1.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "r18.pth")
    tower = VisionTower(VisionConfig.resnet("resnet18", image_size=64))
    with pytest.raises(ValueError, match=r"missing \(1\): stages.0.0.conv1.weight.*unexpected \(1\): extra.weight"):
        load_torchvision_weights(tower, tmp_path / "r18.pth")
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match="shape mismatch"):  # a ResNet-50 file for a ResNet-18 tower
        load_torchvision_weights(tower, tmp_path / "r50.pth")


def test_a_pickle_with_objects_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"conv1.weight": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="weights_only=True"):
        load_torchvision_weights(VisionTower(VisionConfig.resnet("resnet18", image_size=64)), tmp_path / "evil.pth")


def test_a_preset_survives_config_json():
    cfg = ModelConfig(vision=VisionConfig.resnet("resnet50", image_size=96, weights_from="/w/r50.pth"))
    back = ModelConfig.from_dict(cfg.to_dict())
    assert back.vision == cfg.vision and back.vision.stem_kernel == 7 and back.vision.preset == "resnet50"
    assert VisionConfig.resnet("resnet50", image_size=64).grid == 2  # stride 32
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50, resnet101"):
        VisionConfig.resnet("resnet152")


def test_train_with_a_resnet_preset_and_its_weights(tmp_path, small_catalog):
    import json

    from typer.testing import CliRunner

    from vtfusion.models import factory
    from vtfusion.models.train import TrainConfig
    from vtfusion.models.train.joint import JointStage
    from vtfusion.ui.cli import app

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    base = ["train", str(small_catalog / "train.csv"), "--out", str(tmp_path / "m"), "--epochs", "1", "--rerank-epochs", "0",
            "--batch-size", "16", "--device", "cpu", "--image-size", "64"]
    r = CliRunner().invoke(app, [*base, "--image-weights", str(tmp_path / "r18.pth")])
    assert r.exit_code == 2 and "--image-tower resnet18" in r.output  # weights need a torchvision architecture
    r = CliRunner().invoke(app, [*base, "--image-tower", "resnet18", "--image-weights", str(tmp_path / "r18.pth")])
    assert r.exit_code == 0, r.output
    vision = json.loads((tmp_path / "m" / "config.json").read_text())["vision"]
    assert vision["preset"] == "resnet18" and vision["weights_from"] == str((tmp_path / "r18.pth").resolve())
    b = factory.load(tmp_path / "m")
    stage = JointStage.__new__(JointStage)  # the parameter groups alone: the loaded CNN trains as pretrained
    stage.bundle, stage.cfg, stage.mlm = b, TrainConfig(epochs=1, lr=1e-3), None
    cnn = {id(p) for n, p in b.model.named_parameters() if n.startswith(("vision.stem.", "vision.stages."))}
    for g in stage.param_groups():
        in_cnn = {id(p) in cnn for p in g["params"]}
        assert len(in_cnn) == 1 and (g["lr"] == pytest.approx(1e-4)) == in_cnn.pop()
