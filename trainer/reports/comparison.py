"""What a run's top-1 is compared with: the paper's figure where the run trained on the paper's data set for its
model (CIFAR-10, ImageNet: trainer.models.paper_error), the data set's published table (Fashion-MNIST), or nothing,
said. The end of a run prints it; `residual report` puts it beside the run's table."""

from __future__ import annotations

from data_pipeline.published import published_results
from data_pipeline.published import title as dataset_title
from trainer.models import get_model_spec, paper_error

PAPERS = ("cifar10", "imagenet")  # the data sets of the paper's tables (trainer.models.paper_error)


def paper_figure(dataset: str, model: str, protocol: str, shortcut: str | None) -> tuple[float, float | None] | None:
    """The paper's (top-1, top-5) error % for ``model``, only where the run trained on the paper's data set for it."""
    return paper_error(model, protocol, shortcut) if get_model_spec(model).dataset == dataset else None


def published_line(dataset: str, model: str, shortcut: str | None, protocol: str) -> str:
    """What a run's top-1 compares with: the paper's figure (CIFAR-10, ImageNet), the data set's published table
    (Fashion-MNIST), or nothing, said."""
    if (paper := paper_figure(dataset, model, protocol, shortcut)) is not None:
        name = dataset_title(dataset)
        return f"the paper's {model} on {name} ({protocol}): top-1 {100 - paper[0]:.2f}% ({paper[0]:.2f}% error)"
    return published_note(dataset)


def published_note(dataset: str) -> str:
    if results := published_results(dataset):
        shown = ", ".join(f"{who} {accuracy:.1f}%" for who, accuracy in results)
        return f"published top-1 on {dataset_title(dataset)} (the data set's benchmark table, other recipes): {shown}"
    return f"{dataset_title(dataset)}: no published figure to compare with"
