"""Registry, weights files and fingerprints, on small random-weight models (fast, no photos needed)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from models import ModelError, ModelOptions, available_models, create_model


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point torch hub at an empty folder so a developer's own cache cannot change the outcome."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


def random_resnet18() -> torchvision.models.ResNet:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def reference_embedding(module: nn.Module, views: torch.Tensor) -> torch.Tensor:
    """What the zoo should compute: ImageNet-normalised input, avgpool output (fc removed)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    module.fc = nn.Identity()
    with torch.no_grad():
        return module((views.float() - mean) / std)


def views(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ModelError) as excinfo:
        create_model("no-such-model")
    message = str(excinfo.value)
    for name in ("efficientnet_lite0", "resnet50", "dummy", "'timm:<name>'"):
        assert name in message
    assert {"efficientnet_lite0", "resnet50", "dummy"} <= set(available_models())


def test_unknown_timm_architecture() -> None:
    with pytest.raises(ModelError, match="timm has no architecture"):
        create_model("timm:no_such_net", ModelOptions(random_weights=True))


def test_bad_mode_and_dtype_are_refused() -> None:
    with pytest.raises(ModelError, match="execution mode"):
        create_model("dummy", ModelOptions(mode="tensorrt"))
    with pytest.raises(ModelError, match="float16"):
        create_model("dummy", ModelOptions(dtype="float16"))


def test_resnet50_without_weights_refuses_to_start() -> None:
    with pytest.raises(ModelError, match="has no weights"):
        create_model("resnet50")


def test_resnet50_random_weights_gives_2048_d() -> None:
    model = create_model("resnet50", ModelOptions(mode="eager", random_weights=True))
    assert model.dim == 2048
    assert model.embed_views(views()).shape == (2, 2048)


def save_torchscript(module: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():  # torch.jit's upstream deprecation notice; saving one is the point here
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        torch.jit.save(torch.jit.script(module), str(path))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".torchscript.pt"])
def test_weights_file_reproduces_the_module(tmp_path: Path, suffix: str) -> None:
    module = random_resnet18()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(module.state_dict(), str(path))
    elif suffix == ".torchscript.pt":
        save_torchscript(module, path)
    else:
        torch.save({"state_dict": module.state_dict()}, path)  # a training checkpoint's nesting
    model = create_model("resnet18", ModelOptions(mode="eager", weights=str(path)))
    assert model.head is not None and torch.equal(model.head.weight, module.fc.weight)
    batch = views()
    torch.testing.assert_close(model.embed_views(batch), reference_embedding(module, batch), rtol=1e-4, atol=1e-4)


def test_weights_without_classifier_load_without_head(tmp_path: Path) -> None:
    module = random_resnet18()
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "body.pt")
    model = create_model("resnet18", ModelOptions(mode="eager", weights=str(tmp_path / "body.pt")))
    assert model.head is None
    assert model.embed_views(views()).shape == (2, 512)


def test_wrong_shape_fails_loudly(tmp_path: Path) -> None:
    state = random_resnet18().state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match="size mismatch"):
        create_model("resnet18", ModelOptions(weights=str(tmp_path / "bad.pt")))


def test_unexpected_keys_and_garbage_files_fail(tmp_path: Path) -> None:
    state = random_resnet18().state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(ModelError, match="unexpected"):
        create_model("resnet18", ModelOptions(weights=str(tmp_path / "extra.pt")))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a state_dict"):
        create_model("resnet18", ModelOptions(weights=str(tmp_path / "junk.pt")))
    with pytest.raises(ModelError, match="not found"):
        create_model("resnet18", ModelOptions(weights=str(tmp_path / "missing.pt")))


def test_torchvision_hub_cache_is_used_with_its_preprocessing(empty_hub_cache: Path) -> None:
    module = random_resnet18()
    (empty_hub_cache / "checkpoints").mkdir(parents=True)
    torch.save(module.state_dict(), empty_hub_cache / "checkpoints" / "resnet18-f37072fd.pth")
    model = create_model("resnet18", ModelOptions(mode="eager"))
    assert model.spec.preprocess.resize_size == 256 and model.spec.preprocess.input_size == 224
    batch = views()
    torch.testing.assert_close(model.embed_views(batch), reference_embedding(module, batch), rtol=1e-4, atol=1e-4)


def test_timm_names_load_from_a_file(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(0)
    module: Any = timm.create_model("resnet18", pretrained=False).eval()  # forward_head: timm's, untyped
    save_file(module.state_dict(), str(tmp_path / "r18.safetensors"))
    model = create_model("timm:resnet18", ModelOptions(mode="eager", weights=str(tmp_path / "r18.safetensors")))
    assert model.name == "timm:resnet18" and model.dim == 512
    assert model.spec.preprocess.interpolation == "bicubic"  # from timm's pretrained_cfg
    batch = views()
    with torch.no_grad():
        expected = module.forward_head(module.forward_features(model.normalize(batch)), pre_logits=True)
    torch.testing.assert_close(model.embed_views(batch), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelError, match="has no weights"):
        create_model("timm:resnet18")


def test_fingerprint_is_stable_and_names_weights_dtype_and_mode(tmp_path: Path) -> None:
    base = create_model("dummy", ModelOptions(mode="eager")).fingerprint
    assert create_model("dummy", ModelOptions(mode="eager")).fingerprint == base
    assert create_model("dummy", ModelOptions(mode="eager", dtype="bfloat16")).fingerprint != base
    assert create_model("dummy", ModelOptions(mode="torchscript")).fingerprint != base
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(torchvision.models.resnet18().state_dict(), tmp_path / f"w{seed}.pt")
    prints = {create_model("resnet18", ModelOptions(mode="eager", weights=str(tmp_path / f"w{seed}.pt"))).fingerprint
              for seed in (0, 1)}
    assert len(prints) == 2
