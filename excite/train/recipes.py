"""Named training recipes: tuned option sets that ``--recipe NAME`` applies under the user's own flags.

A recipe sets how to train, never what to train on: ``--data`` stays the user's.
"""
from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    # CIFAR-size images on one GPU, as fast as the small-image path allows: the whole set decoded once
    # and augmented on the GPU, bf16, channels-last, compiled. SGD+Nesterov at lr 0.4 for batch 512 is
    # the usual 0.1 per 128 images scaled linearly; one-cycle and label smoothing 0.1 make 10 epochs enough
    # for a ResNet-18-sized model. Validation averages each image's logits with its mirror image's, as
    # airbench does: the model trained on mirrored images, and the second pass costs one more forward over
    # the 5,000 held-out images. On one H200 (2026-12-04) it reached 86.4% of the JPEG CIFAR-10 folder's
    # 5,000 held-out images in 10 epochs (12.4 s after compiling): untuned (bench/README.md).
    "cifar-fast": dict(
        model="se_resnet18_cifar", img_size=32, preset="cifar", epochs=10, batch_size=512,
        opt="sgd", lr=0.4, momentum=0.9, nesterov=True, weight_decay=5e-4, sched="onecycle",
        label_smoothing=0.1, amp="bf16", channels_last=True, compile=True, cache_images=True, tta="flip",
    ),
    # Fine-tuning pretrained weights (--pretrained) on a small folder. SGD+Nesterov at lr 0.01, a tenth of the
    # from-scratch 0.1, so the pretrained features move little; the new, randomly initialised classifier learns
    # 10x faster (--head-lr-mult 10) to catch up with them. A one-epoch warm-up keeps that random head's first,
    # large gradients from wrecking the features before it has learnt anything. Weight decay 1e-4, not 5e-4: the
    # weights start somewhere good, and decay pulls them toward zero rather than toward it. Label smoothing 0.1
    # and cosine decay as in the other recipes; 10 epochs, as a pretrained model converges in a fraction of a
    # from-scratch run (bench/finetune_vs_scratch.py measures this recipe against training from scratch).
    "finetune": dict(
        epochs=10, opt="sgd", lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4, sched="cosine",
        warmup_epochs=1.0, label_smoothing=0.1, head_lr_mult=10.0,
    ),
    # The DenseNet-BC paper's CIFAR schedule (Huang et al., 2017): batch 64, SGD+Nesterov lr 0.1, weight
    # decay 1e-4, 300 epochs; cosine decay replaces the paper's steps at epochs 150 and 225.
    "densenet-bc-paper": dict(
        model="densenet_bc_100", img_size=32, preset="cifar", epochs=300, batch_size=64,
        opt="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, sched="cosine",
    ),
}
