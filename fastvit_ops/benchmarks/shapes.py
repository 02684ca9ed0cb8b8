"""The real layer shapes at 224² (docs/fat.md, docs/fcvit.md, docs/cvt.md), used by benchmarks and checks."""

# FAT-B0 (dims 32/80/160/256, heads 2/5/10/16, local kernels 3/5/7/9, windows 8/4/2/1):
# per stage (channels, H = W, heads, kernel, window).
FAT_B0_STAGES = [(32, 56, 2, 3, 8), (80, 28, 5, 5, 4), (160, 14, 10, 7, 2), (256, 7, 16, 9, 1)]

# FCViT-tiny (dims 32/64/160/320) and FCViT-B12 (64/128/320/512): per stage (channels, H = W).
FCVIT_TINY_STAGES = [(32, 56), (64, 28), (160, 14), (320, 7)]
FCVIT_B12_STAGES = [(64, 56), (128, 28), (320, 14), (512, 7)]

# CvT-13 stages: (channels, H = W, heads).
CVT13_STAGES = [(64, 56, 1), (192, 28, 3), (384, 14, 6)]


def default_batch(device) -> int:
    """Batch 64 on a GPU, 8 on a CPU (docs/benchmarks.md)."""
    return 64 if str(device).startswith("cuda") else 8
