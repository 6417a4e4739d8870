"""Parameter shapes the benchmarks step over: one big tensor, real models, a small MLP.

Shapes only: no model is built, so no torchvision or download is needed.
"""


def single(numel):
    """One flat tensor of ``numel`` parameters."""
    return [(numel,)]


def resnet50():
    """The 161 parameter tensors of torchvision's ResNet-50 (25,557,032 parameters)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for width, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        out_channels = width * 4
        for block in range(blocks):
            shapes += [(width, in_channels, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out_channels, width, 1, 1), (out_channels,), (out_channels,)]
            if block == 0:
                shapes += [(out_channels, in_channels, 1, 1), (out_channels,), (out_channels,)]
            in_channels = out_channels
    shapes += [(1000, 2048), (1000,)]
    return shapes


def gpt2_blocks(blocks=4, width=768):
    """``blocks`` GPT-2-small transformer blocks (12 tensors, 7.08M parameters each)."""
    shapes = []
    for _ in range(blocks):
        shapes += [(width,), (width,)]  # ln_1
        shapes += [(width, 3 * width), (3 * width,)]  # attention qkv
        shapes += [(width, width), (width,)]  # attention output projection
        shapes += [(width,), (width,)]  # ln_2
        shapes += [(width, 4 * width), (4 * width,)]  # MLP in
        shapes += [(4 * width, width), (width,)]  # MLP out
    return shapes


def mlp():
    """The 784-256-10 MLP (203,530 parameters), where per-step overhead dominates."""
    return [(256, 784), (256,), (10, 256), (10,)]


LAYOUTS = {
    "16M tensor": lambda: single(16 * 2**20),
    "ResNet-50": resnet50,
    "GPT-2 x4 blocks": gpt2_blocks,
    "MLP 784-256-10": mlp,
}


def numel(shapes):
    total = 0
    for shape in shapes:
        count = 1
        for size in shape:
            count *= size
        total += count
    return total
