"""The paper's and the modern recipes' augmentations: torchvision v2 pipelines for the torch path and the batched
tensor ops of the CIFAR/IDX tensor path (transforms), and the per-sample draws that the tensor and DALI paths share
(draws)."""
