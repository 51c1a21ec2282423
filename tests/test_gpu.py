"""The GPU paths compute what the plain ones do: on a CUDA GPU when there is one (``python -m pytest
tests/test_gpu.py`` on a GPU machine), otherwise on the CPU, so that the suite keeps these tests in step with
the code where no GPU is (as on CI): the first GPU run of this file, on 2026-12-04, found three of its tests
still expecting a best.pt that runs had stopped writing. ``EXCITE_GPU_TESTS_DEVICE`` picks the device.
"""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

from excite import bench
from excite.data.gpu_cache import CachedLoader, TensorCache, crop_flip
from excite.models import create_model
from excite.nn.dense_fast import make_fast
from excite.nn.fold import fold_batchnorm
from excite.train.checkpoint import load_checkpoint
from excite.train.config import TrainConfig
from excite.train.fit import fit, resume_config

DEVICE = torch.device(os.environ.get("EXCITE_GPU_TESTS_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
# torch.compile on a CPU spends about a minute compiling C++: those cases are slow there (still run by default).
SLOW_ON_CPU = [pytest.mark.slow] if DEVICE.type == "cpu" else []


def slow_on_cpu(test):
    return pytest.mark.slow(test) if SLOW_ON_CPU else test


def tiny_densenet():
    torch.manual_seed(0)
    return create_model("densenet_bc_100", num_classes=5, block_config=(2, 3), growth_rate=4, attn_layer="se")


def step(model, x, y, amp: bool):
    """Logits and parameter gradients of one training step, autocast to bf16 when ``amp``."""
    model.zero_grad()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
        F.cross_entropy(out, y).backward()
    return out.float(), torch.cat([p.grad.flatten() for p in model.parameters()])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def exact_fp32():
    """Full fp32 convolutions and matrix products: CUDA's default TF32 rounds inputs to 10 mantissa bits."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_densenet_matches_the_plain_one(channels_last, exact_fp32):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    plain = tiny_densenet().to(DEVICE, memory_format=memory_format)
    fast = make_fast(copy.deepcopy(plain))
    torch.manual_seed(1)
    x = torch.randn(8, 3, 16, 16, device=DEVICE).contiguous(memory_format=memory_format)
    y = torch.randint(5, (8,), device=DEVICE)

    # fp32: the same function up to rounding (GPU convolutions pick their own algorithms per call).
    plain_out, plain_grads = step(plain, x, y, amp=False)
    fast_out, fast_grads = step(fast, x, y, amp=False)
    torch.testing.assert_close(fast_out, plain_out, rtol=1e-4, atol=1e-4)
    assert relative_error(fast_grads, plain_grads) < 1e-4
    for name, value in plain.state_dict().items():  # running statistics and batch counts
        torch.testing.assert_close(fast.state_dict()[name].float(), value.float(), rtol=1e-4, atol=1e-5)

    # bf16: both are off the fp32 result; the fast path may not be further off than the plain one.
    amp_plain_out, amp_plain_grads = step(plain, x, y, amp=True)
    amp_fast_out, amp_fast_grads = step(fast, x, y, amp=True)
    assert relative_error(amp_fast_out, plain_out) <= 1.5 * relative_error(amp_plain_out, plain_out) + 1e-3
    assert relative_error(amp_fast_grads, plain_grads) <= 1.5 * relative_error(amp_plain_grads, plain_grads) + 1e-3


@slow_on_cpu
def test_fast_densenet_under_torch_compile_matches_eager(exact_fp32):
    plain = tiny_densenet().to(DEVICE)
    fast = make_fast(copy.deepcopy(plain))
    x = torch.randn(4, 3, 16, 16, device=DEVICE)
    expected = plain.train()(x)
    torch.testing.assert_close(torch.compile(fast).train()(x), expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["se_resnet20_cifar", "densenet_bc_100"])
def test_folded_batchnorm_matches_eval_mode(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).to(DEVICE)
    x = torch.randn(8, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        model(x + torch.randn_like(x))  # running statistics that folding must carry over
    model.eval()
    folded = fold_batchnorm(model).to(DEVICE)
    with torch.no_grad():
        expected, out = model(x), folded(x)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_cached_loader_on_the_device_crops_flips_and_labels_like_the_cpu():
    torch.manual_seed(0)
    images = torch.randint(256, (11, 3, 10, 10), dtype=torch.uint8)
    top, left = torch.randint(9, (2, 11))
    flip = torch.rand(11) < 0.5
    on_device = crop_flip(images.to(DEVICE), top.to(DEVICE), left.to(DEVICE), flip.to(DEVICE), pad=4)
    assert torch.equal(on_device.cpu(), crop_flip(images, top, left, flip, pad=4))

    loader = CachedLoader(TensorCache(images, torch.arange(11)), 4, train=True, device=DEVICE, seed=3,
                          dtype=torch.bfloat16, channels_last=True)
    loader.set_epoch(2)
    batches = list(loader)
    assert all(x.device.type == DEVICE.type and x.dtype == torch.bfloat16 for x, _ in batches)
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in batches)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(11))
    again = CachedLoader(TensorCache(images, torch.arange(11)), 4, train=True, device=DEVICE, seed=3,
                         dtype=torch.bfloat16, channels_last=True)
    again.set_epoch(2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))  # a pure function of (seed, epoch)


@pytest.mark.parametrize("options", [
    {"amp": "bf16", "channels_last": True},
    pytest.param({"amp": "bf16", "channels_last": True, "compile": True}, marks=SLOW_ON_CPU),
    pytest.param({"amp": "fp16"}, marks=pytest.mark.skipif(DEVICE.type != "cuda", reason="fp16 runs need CUDA")),
])
def test_a_run_trains_checkpoints_and_resumes_on_the_device(options, image_folder, tmp_path):
    config = TrainConfig(model="resnet20_cifar", model_kwargs={"widths": [8, 16, 16]}, data=str(image_folder),
                         out=str(tmp_path / "run"), epochs=3, batch_size=8, img_size=16, lr=0.05, seed=0,
                         device=DEVICE.type, tta="flip", **options)
    fit(TrainConfig(**{**config.to_dict(), "epochs": 2}), log=lambda _: None)
    result = fit(resume_config(tmp_path / "run", epochs=3), resume=True, log=lambda _: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert all(row["train_loss"] == row["train_loss"] and row["train_loss"] > 0 for row in rows)  # not NaN
    assert rows[-1]["train_acc"] > 0.5  # the three colour classes separate within three epochs
    # The default save policy keeps the best weights as best.safetensors and the state to resume in last.pt:
    # both must read on a machine without the device.
    assert json.loads((tmp_path / "run" / "best_val.json").read_text())["epoch"] == result.best_epoch
    best = load_checkpoint(tmp_path / "run" / "best.safetensors")
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 3
    assert all(t.device.type == "cpu" for ckpt in (best, last) for t in ckpt["model"].values())


@slow_on_cpu
def test_benchmark_measures_time_and_memory_on_the_device():
    result = bench.benchmark("resnet18", batch_size=4, img_size=64, device=DEVICE.type, warmup=1, iters=2,
                             repeats=2, amp="bf16", channels_last=True, compile="excite")
    assert result["device_type"] == DEVICE.type
    assert {"excite", "excite-fast", "excite+compile", "torchvision", "timm"} <= set(result["results"])
    for impl, r in result["results"].items():
        for mode in ("train", "infer"):
            if mode in r:
                assert r[mode]["img_per_s"] > 0 and r[mode]["peak_mem_mib"] > 0, (impl, mode)
