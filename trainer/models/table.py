"""The networks of the paper by name, with its figures for each (Table 1, Table 6): plain data, no torch, so that
a config can be checked without importing it."""

# ImageNet (Table 1): depth, block, blocks per stage, parameters, multiply-adds at 224x224
IMAGENET_NETS = (
    (18, "basic", (2, 2, 2, 2), 11.7e6, 1.8e9),
    (34, "basic", (3, 4, 6, 3), 21.8e6, 3.6e9),
    (50, "bottleneck", (3, 4, 6, 3), 25.6e6, 3.8e9),
    (101, "bottleneck", (3, 4, 23, 3), 44.5e6, 7.6e9),
    (152, "bottleneck", (3, 8, 36, 3), 60.2e6, 11.3e9),
)
IMAGENET_PLAIN = (18, 34)  # the plain nets of Table 2
# CIFAR-10 (Table 6): depth (6n+2), parameters
CIFAR_NETS = ((20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6), (110, 1.7e6), (1202, 19.4e6))
CIFAR_PLAIN = (20, 32, 44, 56)  # the plain nets of Fig. 6

MODEL_NAMES = (
    *(f"resnet{depth}" for depth, *_ in IMAGENET_NETS),
    *(f"plain{depth}" for depth in IMAGENET_PLAIN),
    *(f"resnet{depth}" for depth, _ in CIFAR_NETS),
    *(f"plain{depth}" for depth in CIFAR_PLAIN),
)
