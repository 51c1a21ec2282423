"""Class-activation maps (excite.explain.cam): their shape and range, that they find the object a model learned to
classify, the default layer of every registered model, and ``explain_images`` from a run directory to its page."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("captum")

from excite.cli import main
from excite.errors import DataError, ExciteError  # noqa: E402
from excite.explain.cam import cam, default_target_layer, explain_images, overlay  # noqa: E402
from excite.models import create_model, list_models  # noqa: E402
from excite.train.config import TrainConfig  # noqa: E402
from excite.train.fit import fit  # noqa: E402

SIDE, BOX = 24, 8
#: The object's colour for classes 0 and 1 (RGB in [0, 1]); class 2 has no object.
OBJECT_COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 0.1, 1.0]])


def object_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` normalised images of grey noise, classes 0, 1, 2 in turn: a red (0) or blue (1) BOX x BOX square at a
    random place, or none (2). Returns the images, labels and each square's top-left corner (row, column).

    The class is the square's colour, not its place: a network that pools globally hardly knows where anything
    is, so a class decided by place would be learned from the border's padding, or as "no square on the other
    side", and its map need not show the square. The third class makes both squares evidence of their own class,
    not only evidence against the other."""
    generator = torch.Generator().manual_seed(seed)
    images = (0.5 + 0.15 * torch.randn(n, 1, SIDE, SIDE, generator=generator)).expand(n, 3, SIDE, SIDE).clone()
    labels = torch.arange(n) % 3
    corners = torch.randint(0, SIDE - BOX + 1, (n, 2), generator=generator)
    for image, label, (row, col) in zip(images, labels, corners.tolist()):
        if label < 2:
            image[:, row:row + BOX, col:col + BOX] = OBJECT_COLOURS[label][:, None, None]
    return (images - 0.5) / 0.25, labels, corners


@pytest.fixture(scope="module")
def trained():
    """A tiny SE-ResNet trained to tell the squares apart, and 16 new images with a square (labels, corners)."""
    torch.manual_seed(0)
    model = create_model("se_resnet20_cifar", num_classes=3, layers=(1, 1, 1), widths=(4, 8, 8))
    images, labels, _ = object_images(192, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)  # Adam: 30 steps are enough, SGD needs many more
    model.train()
    for _ in range(30):
        batch = torch.randint(0, len(images), (32,))
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # The running BatchNorm statistics lag 30 fast-moving steps; one pass over the training set sets them exactly.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: after one pass, that pass's statistics
    with torch.no_grad():
        model(images)
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    test_images, test_labels, corners = object_images(24, seed=1)
    with torch.no_grad():
        accuracy = (model(test_images).argmax(1) == test_labels).float().mean().item()
    assert accuracy >= 0.9, f"the model did not learn the squares (accuracy {accuracy:.0%}): the test means nothing"
    has_object = test_labels < 2
    return model, test_images[has_object], test_labels[has_object], corners[has_object]


@pytest.mark.parametrize("method", ["gradcam", "occlusion"])
def test_a_map_is_image_sized_finite_in_unit_range_and_leaves_the_model_as_it_was(trained, method):
    model, images, labels, _ = trained
    model.train()  # cam works in eval mode and hands the model back in train mode
    try:
        maps = cam(model, images[:4], method=method)
    finally:
        model.eval()
    assert isinstance(maps, np.ndarray) and maps.shape == (4, SIDE, SIDE) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and np.allclose(maps.max(axis=(1, 2)), 1)
    assert all(m.std() > 0.05 for m in maps)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["gradcam", "occlusion"])
def test_the_peak_of_the_map_follows_the_object(trained, method):
    model, images, labels, corners = trained
    maps = cam(model, images, target=labels, method=method)
    peaks = np.array([np.unravel_index(m.argmax(), m.shape) for m in maps])
    distance = np.hypot(*(peaks - (corners.numpy() + (BOX - 1) / 2)).T)
    for label in (0, 1):
        found = distance[labels.numpy() == label] <= BOX * 0.75  # on the square or just at its edge
        assert found.mean() >= 0.8, f"class {label}: peaks at {distance.round(1)} pixels from the squares' centres"
    # The map's mass, not only its peak, lies on the square's half of the image.
    columns = maps.sum(axis=1)
    on_left = columns[:, :SIDE // 2].sum(1) > columns[:, SIDE // 2:].sum(1)
    square_left = corners[:, 1].numpy() + BOX / 2 <= SIDE / 2
    assert (on_left == square_left).mean() >= 0.8


def test_a_target_chooses_the_class_of_the_map(trained):
    model, images, labels, _ = trained
    red = images[labels == 0][:2]
    assert np.allclose(cam(model, red), cam(model, red, target=0))
    assert not np.allclose(cam(model, red, target=0), cam(model, red, target=[2, 2]))
    with pytest.raises(ValueError, match=r"^target classes must be in 0\.\.2, got \[3, 3\]$"):
        cam(model, red, target=3)


#: The expected default layer of each family, by the start of the model's name.
FAMILY_LAYERS = {"resnet18_cifar": "layer4", "se_resnet18_cifar": "layer4", "resdense": "features.relu5",
                 "dpn": "features.conv5_bn_ac", "densenet": "features.norm5", "se_densenet": "features.norm5"}


def expected_layer(name: str) -> str:
    if name in FAMILY_LAYERS:
        return FAMILY_LAYERS[name]
    if "resnet" in name:
        return "layer3" if name.endswith("_cifar") else "layer4"
    return next(layer for prefix, layer in FAMILY_LAYERS.items() if name.startswith(prefix))


@pytest.mark.parametrize("name", list_models())
def test_the_default_layer_outputs_the_final_feature_map(name):
    with torch.device("meta"):  # no memory, no arithmetic: only the shapes, so the big models cost nothing
        model = create_model(name, num_classes=3)
    layer = default_target_layer(model)
    assert layer == expected_layer(name)
    shapes = []
    dict(model.named_modules())[layer].register_forward_hook(lambda _m, _i, output: shapes.append(output.shape))
    with torch.no_grad():
        model(torch.zeros(2, 3, 64, 64, device="meta"))
    assert len(shapes) == 1 and len(shapes[0]) == 4 and shapes[0][1] == model.get_classifier().in_features


def test_se_on_the_final_features_is_part_of_the_default_layer():
    with torch.device("meta"):
        model = create_model("se_densenet121", se_placement="final", num_classes=3)
    assert default_target_layer(model) == "attn"


def test_a_layer_that_is_not_a_feature_map_is_one_line_naming_valid_ones(trained):
    model, images, _, _ = trained
    with pytest.raises(ValueError, match=r"^ResNet has no layer 'layer9': give a module name such as relu, layer1, "
                                         r"layer2, layer3$"):
        cam(model, images[:1], layer="layer9")
    with pytest.raises(ValueError, match=r"^layer 'fc' does not output a feature map \(N, C, H, W\): choose a stage "):
        cam(model, images[:1], layer="fc")
    with pytest.raises(ValueError, match="^unknown CAM method 'lime': choose one of gradcam, occlusion$"):
        cam(model, images[:1], method="lime")
    assert cam(model, images[:1], layer="layer2.0").shape == (1, SIDE, SIDE)  # any map will do, named


def test_without_captum_cam_says_how_to_install_it(trained, monkeypatch):
    model, images, _, _ = trained
    monkeypatch.setitem(sys.modules, "captum", None)  # what an uninstalled package looks like to import
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(ExciteError) as caught:
        cam(model, images[:1])
    assert str(caught.value) == "excite explain needs Captum: pip install 'excite[explain]'"


def test_overlay_blends_a_colormap_over_the_image():
    image = torch.full((3, 5, 7), 200, dtype=torch.uint8)
    heat = np.linspace(0, 1, 35).reshape(5, 7)
    blended = overlay(image, heat)
    assert blended.shape == (5, 7, 3) and blended.dtype == np.uint8
    assert not (blended[0, 0] == blended[-1, -1]).all()
    assert (overlay(image, heat, alpha=0) == 200).all()
    with pytest.raises(ValueError, match=r"^heatmap \(7, 5\) and image \(5, 7\) differ in size$"):
        overlay(image, heat.T)


def test_explain_images_writes_maps_predictions_and_a_page_for_a_run(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    fit(TrainConfig(model="resnet20_cifar", model_kwargs={"widths": [4, 8, 8]}, data=str(image_folder), epochs=1,
                    batch_size=8, img_size=16, device="cpu", out=str(run)), log=lambda _: None)
    (tmp_path / "broken.png").write_bytes(b"not a PNG")
    # Two images named 000.png: their maps must not overwrite each other.
    inputs = [image_folder / "red" / "000.png", image_folder / "blue" / "000.png", tmp_path / "broken.png"]
    lines, warnings = [], []
    results = explain_images(run, inputs, tmp_path / "out", topk=2, device="cpu", log=lines.append,
                             log_error=warnings.append)

    assert len(warnings) == 1 and warnings[0].startswith(f"skipping {tmp_path / 'broken.png'}: "), warnings
    written = json.loads((tmp_path / "out" / "explain.json").read_text())
    assert written["images"] == results and written["layer"] == "layer3" and written["model"] == "resnet20_cifar"
    assert [r["path"] for r in results] == [str(p) for p in inputs[:2]]
    for result in results:
        assert len(result["predictions"]) == 2
        assert {p["class"] for p in result["predictions"]} <= {"blue", "green", "red"}
        assert result["predictions"][0]["probability"] >= result["predictions"][1]["probability"]
    assert results[0]["maps"] == {"gradcam": "000-gradcam.png", "occlusion": "000-occlusion.png"}
    assert results[1]["maps"] == {"gradcam": "000-2-gradcam.png", "occlusion": "000-2-occlusion.png"}
    for result in results:
        for name in result["maps"].values():
            with Image.open(tmp_path / "out" / name) as png:
                assert png.size == (224, 224) and png.mode == "RGB"  # 16 pixels, enlarged 14 times
    page = (tmp_path / "out" / "index.html").read_text()
    assert page.count("<img ") == 2 * 3 and page.count("<table>") == 2  # the input and two maps, per image
    assert lines[-1].startswith("Wrote 4 maps of 2 images")

    with pytest.raises(DataError, match=r"^none of the 1 inputs could be read as an image"):
        explain_images(run, [tmp_path / "broken.png"], tmp_path / "out2", device="cpu", log=lambda _: None)
    with pytest.raises(ExciteError, match=r"^ResNet has no layer 'nope': give a module name such as "):
        explain_images(run, inputs[:1], tmp_path / "out3", layer="nope", device="cpu", log=lambda _: None)

    # The command: the maps land in explain/ beside the checkpoint; a bad --method or --layer is one line.
    assert main(["explain", str(run), str(inputs[0]), "--method", "gradcam", "--topk", "1"]) == 0
    assert (run / "explain" / "000-gradcam.png").exists() and not (run / "explain" / "000-occlusion.png").exists()
    for bad in (["--method", "gradcam,lime"], ["--layer", "fc"]):
        capsys.readouterr()
        assert main(["explain", str(run), str(inputs[0]), "--out", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("excite: error: "), err
