"""--pretrained by name: files placed in temporary torch.hub and Hugging Face caches are found and loaded, with
their preprocessing; nothing is downloaded, and a missing file or an unfit name is one line."""
from __future__ import annotations

import json
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from excite.cli import main
from excite.errors import CheckpointError, ExciteError
from excite.models import create_model
from excite.models.pretrained import resolve_pretrained

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty torch.hub and Hugging Face caches in ``tmp_path``, Hugging Face offline, and no download possible."""
    torch_home, hf_cache = tmp_path / "torch", tmp_path / "hf"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    # huggingface_hub reads its environment once, when imported (maybe before this test): set what it read.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return SimpleNamespace(checkpoints=torch_home / "hub" / "checkpoints", hf=hf_cache)


def put_torchvision_file(caches, weights, state: dict) -> Path:
    """``state`` saved as torchvision's release of ``weights`` in the torch.hub cache (named as its URL is)."""
    caches.checkpoints.mkdir(parents=True, exist_ok=True)
    path = caches.checkpoints / Path(weights.url).name
    torch.save(state, path)
    return path


def put_hf_file(caches, repo_id: str, state: dict) -> Path:
    """``state`` saved as ``model.safetensors`` of ``repo_id`` in the Hugging Face cache's layout."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = caches.hf / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, repo / "snapshots" / commit / "model.safetensors")
    return repo / "snapshots" / commit / "model.safetensors"


def test_torchvision_names_resolve_to_the_torch_hub_cache_with_their_preprocessing(caches):
    tiny = {"conv1.weight": torch.zeros(1)}  # resolving does not read the file
    path = put_torchvision_file(caches, torchvision.models.DenseNet121_Weights.IMAGENET1K_V1, tiny)
    assert path.name == "densenet121-a639ec97.pth"
    for name in ("torchvision", "IMAGENET1K_V1", "DEFAULT", "DenseNet121_Weights.IMAGENET1K_V1"):
        weights = resolve_pretrained(name, "densenet121")
        assert weights.path == path and weights.description == "torchvision's DenseNet121_Weights.IMAGENET1K_V1"
        pre = weights.preprocessing
        assert (pre.preset, pre.img_size, pre.crop_pct) == ("imagenet", 224, 224 / 256)
        assert list(pre.mean) == IMAGENET_MEAN and list(pre.std) == IMAGENET_STD
    # ResNet-50's V2 weights are evaluated at resize 232, crop 224.
    put_torchvision_file(caches, torchvision.models.ResNet50_Weights.IMAGENET1K_V2, tiny)
    assert resolve_pretrained("ResNet50_Weights.IMAGENET1K_V2", "se_resnet50").preprocessing.crop_pct == 224 / 232


def test_missing_torchvision_file_says_which_file_goes_where(caches):
    with pytest.raises(CheckpointError) as error:
        resolve_pretrained("torchvision", "densenet121")
    message = str(error.value)
    assert "\n" not in message and "torchvision's DenseNet121_Weights.IMAGENET1K_V1" in message
    assert f"put densenet121-a639ec97.pth (from https://download.pytorch.org/models/densenet121-a639ec97.pth) in " \
           f"{caches.checkpoints}" in message


def test_a_name_that_does_not_fit_the_model_lists_the_models_with_weights(caches):
    for name in ("IMAGENET1K_V1", "torchvision"):
        with pytest.raises(ExciteError, match=r"^torchvision has no weights for se_densenet121\. torchvision has "
                                              r"weights for densenet121.*timm for .*seresnet50 \(se_resnet50\)"):
            resolve_pretrained(name, "se_densenet121")
    with pytest.raises(ExciteError, match=r"^torchvision has no weights 'IMAGENET1K_V9' for resnet50 .*its weights: "
                                          r"IMAGENET1K_V1, IMAGENET1K_V2$"):
        resolve_pretrained("IMAGENET1K_V9", "resnet50")


def test_urls_keep_their_two_slashes_and_use_the_torch_hub_cache(caches):
    url = "https://example.com/weights/resnet20-0123abcd.pth"
    with pytest.raises(CheckpointError, match=r"could not fetch https://example\.com/weights/resnet20-0123abcd\.pth "
                                              r"\(.*no network in tests.*\): put resnet20-0123abcd\.pth"):
        resolve_pretrained(url, "resnet20_cifar")
    source = create_model("resnet20_cifar", widths=[4, 8, 8])
    assert caches.checkpoints.is_dir()  # made to fetch into, as torch.hub does
    torch.save(source.state_dict(), caches.checkpoints / "resnet20-0123abcd.pth")
    model = create_model("resnet20_cifar", pretrained=url, widths=[4, 8, 8])
    torch.testing.assert_close(model.state_dict(), source.state_dict())


def test_create_model_loads_torchvision_weights_by_name_and_reports_fresh_attention_layers(caches):
    reference = torchvision.models.resnet18()
    put_torchvision_file(caches, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, reference.state_dict())
    model = create_model("resnet18", pretrained="torchvision")
    torch.testing.assert_close(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    with pytest.warns(UserWarning) as warned:
        se = create_model("se_resnet18", pretrained="ResNet18_Weights.IMAGENET1K_V1", num_classes=5)
    assert [str(w.message) for w in warned] == [
        "se_resnet18: classifier left at its initial values (the source head has another shape: fc.weight, fc.bias)",
        "se_resnet18: 8 attention layers left at their initial values: layer1.0.attn, layer1.1.attn, "
        "layer2.0.attn, ..."]
    torch.testing.assert_close(se.conv1.weight, reference.conv1.weight)


def test_timm_names_resolve_to_the_hugging_face_cache(caches):
    pytest.importorskip("timm")
    path = put_hf_file(caches, "timm/seresnet50.a1_in1k", {"conv1.weight": torch.zeros(1)})
    weights = resolve_pretrained("timm:seresnet50.a1_in1k", "se_resnet50")
    assert weights.path == path and weights.description == "timm's seresnet50.a1_in1k"
    pre = weights.preprocessing
    assert (pre.img_size, pre.crop_pct, list(pre.mean), list(pre.std)) == (224, 0.95, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(CheckpointError) as error:  # the ra2 weights are not in the cache
        resolve_pretrained("timm:seresnet50.ra2_in1k", "se_resnet50")
    message = str(error.value)
    assert "\n" not in message and message.startswith("HF_HUB_OFFLINE is set to fetch timm's seresnet50.ra2_in1k")
    assert f"put model.safetensors (from https://huggingface.co/timm/seresnet50.ra2_in1k) in " \
           f"{caches.hf / 'models--timm--seresnet50.ra2_in1k'}/snapshots/<commit>/" in message
    with pytest.raises(ExciteError, match=r"^timm has no pretrained weights 'seresnet50\.nope'"):
        resolve_pretrained("timm:seresnet50.nope", "se_resnet50")


def test_timm_weights_load_by_name_from_the_hub_cache_or_torch_hubs(caches):
    timm = pytest.importorskip("timm")
    reference = timm.create_model("resnet18")
    put_hf_file(caches, "timm/resnet18.a1_in1k", reference.state_dict())
    with pytest.warns(UserWarning, match=r"se_resnet18: 8 attention layers left at their initial values"):
        model = create_model("se_resnet18", pretrained="timm:resnet18.a1_in1k")
    torch.testing.assert_close(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    # Older timm weights have a URL and no Hub id: they live in torch.hub's cache.
    caches.checkpoints.mkdir(parents=True)
    torch.save({"conv1.weight": torch.zeros(1)}, caches.checkpoints / "seresnet18-4bb0ce65.pth")
    assert resolve_pretrained("timm:legacy_seresnet18.in1k", "se_resnet18").path == \
        caches.checkpoints / "seresnet18-4bb0ce65.pth"


def test_timm_names_without_timm_name_the_extra(caches, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "timm.models", None)
    with pytest.raises(ExciteError, match=r"^--pretrained timm:seresnet50\.a1_in1k needs timm: pip install "
                                          r"'excite\[pretrained\]'$"):
        resolve_pretrained("timm:seresnet50.a1_in1k", "se_resnet50")


def test_a_missing_file_is_one_line_naming_the_other_forms(tmp_path):
    with pytest.raises(CheckpointError, match=r"weights file .*nothere\.pt does not exist \(--pretrained also takes a "
                                              r"URL, torchvision"):
        resolve_pretrained(str(tmp_path / "nothere.pt"), "resnet18")


def _train(image_folder, run, *flags) -> int:
    return main(["train", "--model", "resnet18", "--data", str(image_folder), "--out", str(run), "--epochs", "1",
                 "--batch-size", "12", "--workers", "0", "--progress-seconds", "0", *flags])


@pytest.fixture
def resnet18_weights(caches):
    """torchvision's ResNet18_Weights.IMAGENET1K_V1 file (random values) in the prepared torch.hub cache."""
    put_torchvision_file(caches, torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
                         torchvision.models.resnet18().state_dict())


def test_named_weights_set_the_runs_normalisation_and_crop_and_eval_uses_them(resnet18_weights, image_folder, tmp_path,
                                                                              capsys):
    run = tmp_path / "run"
    # --img-size keeps the test fast; the weights' normalisation and crop still apply.
    with pytest.warns(UserWarning, match="classifier left at its initial values"):
        assert _train(image_folder, run, "--pretrained", "torchvision", "--img-size", "32") == 0
    out = capsys.readouterr().out
    assert "Inputs follow torchvision's ResNet18_Weights.IMAGENET1K_V1: imagenet preset, 32 px, centre crop 0.875, " \
           "mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)" in out
    assert "resize the shorter side to 36, random 32x32 crop (validation: the centre crop, 0.875 of the side), " \
           "random horizontal flip; normalised with the given mean (0.485, 0.456, 0.406)" in out
    assert "Input (the weights chose imagenet): " in out  # not "--preset auto chose": the weights did
    config = json.loads((run / "config.json").read_text())
    assert (config["preset"], config["img_size"], config["crop_pct"]) == ("imagenet", 32, 0.875)
    assert config["mean"] == IMAGENET_MEAN and config["std"] == IMAGENET_STD
    assert config["requested"]["mean"] is None and config["requested"]["preset"] == "auto"

    from excite.inference import load_for_inference
    transform = load_for_inference(run, torch.device("cpu"))[2]
    steps = {type(t).__name__: t for t in transform.transforms}
    assert steps["Resize"].size == [36] and steps["CenterCrop"].size == (32, 32)
    assert steps["Normalize"].mean == IMAGENET_MEAN and steps["Normalize"].std == IMAGENET_STD


def test_an_explicit_cifar_preset_on_imagenet_weights_is_kept_with_a_warning(resnet18_weights, image_folder, tmp_path,
                                                                            capsys):
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="classifier left at its initial values"):
        assert _train(image_folder, run, "--pretrained", "IMAGENET1K_V1", "--preset", "cifar") == 0
    out = capsys.readouterr().out
    assert "Warning: --preset cifar normalises with mean (0.491, 0.482, 0.447) and std (0.247, 0.243, 0.262), but " \
           "torchvision's ResNet18_Weights.IMAGENET1K_V1 was trained on 224-px images normalised with mean " \
           "(0.485, 0.456, 0.406)" in out
    config = json.loads((run / "config.json").read_text())
    assert (config["preset"], config["img_size"], config["mean"], config["crop_pct"]) == ("cifar", 32, None, None)


def test_an_excite_weights_file_brings_its_preset_and_size(image_folder, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["train", "--model", "resnet20_cifar", "--model-arg", "widths=[4,8,8]", "--data", str(image_folder),
                 "--out", str(first), "--epochs", "1", "--batch-size", "8", "--img-size", "24", "--preset", "plain",
                 "--workers", "0"]) == 0
    second = tmp_path / "second"
    assert main(["train", "--model", "resnet20_cifar", "--model-arg", "widths=[4,8,8]", "--data", str(image_folder),
                 "--out", str(second), "--epochs", "1", "--batch-size", "8", "--workers", "0",
                 "--pretrained", str(first / "best.safetensors")]) == 0
    assert f"Inputs follow {first / 'best.safetensors'}: plain preset, 24 px, plain normalisation" \
           in capsys.readouterr().out
    config = json.loads((second / "config.json").read_text())
    assert (config["preset"], config["img_size"]) == ("plain", 24)


def test_missing_named_weights_stop_train_with_one_line(caches, image_folder, tmp_path, capsys):
    assert _train(image_folder, tmp_path / "run", "--pretrained", "torchvision") == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("excite: error: could not fetch torchvision's "
                                               "ResNet18_Weights.IMAGENET1K_V1"), err
    assert str(caches.checkpoints) in err[0]
    assert not (tmp_path / "run" / "last.pt").exists()
