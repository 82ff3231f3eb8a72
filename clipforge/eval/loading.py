"""Every task's data read and checked before any model work: a bad folder fails the job in seconds."""
from __future__ import annotations

from dataclasses import dataclass, field

from clipforge.eval.datasets import load_labelled_source, load_retrieval_table, load_retrieval_webdataset
from clipforge.eval.errors import EvalDataError
from clipforge.eval.fingerprint import digest_items
from clipforge.eval.spec import FewShotTask, IdxSource, LinearProbeTask, RetrievalTask, ZeroShotTask
from clipforge.eval.templates import get_templates


@dataclass
class ImageSet:
    """One list of images a task embeds; `digest` identifies its content for the cache."""

    name: str
    items: list[dict]
    labels: list[int] = field(default_factory=list)
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = digest_items(self.items)


@dataclass
class LoadedTask:
    task: RetrievalTask | ZeroShotTask | LinearProbeTask | FewShotTask
    images: list[ImageSet]
    captions: list[str] = field(default_factory=list)
    caption_image: list[int] = field(default_factory=list)
    classnames: list[str] = field(default_factory=list)
    templates: list[str] | dict[str, list[str]] = field(default_factory=list)
    n_classes: int = 0


def _source_name(source) -> str:
    return source.path if source.kind == "image_folder" else source.images


def _load_probe(task: LinearProbeTask | FewShotTask) -> LoadedTask:
    sets, names = [], []
    for split, source in (("train", task.train), ("test", task.test)):
        items, labels, classnames = load_labelled_source(source)
        sets.append(ImageSet(f"{task.dataset}/{split}", items, labels))
        names.append(classnames)
    if names[0] is not None and names[1] is not None and names[0] != names[1]:
        raise ValueError(
            f"task {task.dataset!r}: train classes {names[0]} ({_source_name(task.train)}) differ from test classes "
            f"{names[1]} ({_source_name(task.test)})"
        )
    n_classes = len(names[0]) if names[0] is not None else 1 + max(max(s.labels) for s in sets)
    return LoadedTask(task, sets, classnames=names[0] or [], n_classes=n_classes)


def load_retrieval(task: RetrievalTask) -> tuple[list[dict], list[str], list[int]]:
    """Image items, captions and each caption's image index, from the task's shards or table."""
    if task.shards is not None:
        return load_retrieval_webdataset(task.shards)
    assert task.table is not None  # a retrieval task reads `shards` or a `table`
    return load_retrieval_table(task.table, task.image_column, task.caption_column, task.table_format)


def load_zeroshot(task: ZeroShotTask) -> tuple[list[dict], list[int], list[str]]:
    """Image items, labels and the class names prompts are built from, from the task's folder or IDX files."""
    source = task.labelled_source()
    items, labels, folder_names = load_labelled_source(source)
    if isinstance(source, IdxSource):
        # IDX labels are class indices into the given classnames (the spec requires them for IDX files).
        assert task.classnames is not None
        if not labels:
            raise ValueError(f"{source.images} holds no images")
        top = max(labels)
        if top >= len(task.classnames):
            raise ValueError(f"{source.labels} holds label {top} but only {len(task.classnames)} classnames are "
                             f"given (labels 0..{len(task.classnames) - 1})")
        return items, labels, task.classnames
    assert folder_names is not None  # the sub-folder names of an image folder
    classnames = task.classnames or folder_names
    if len(classnames) != len(folder_names):
        raise ValueError(
            f"{len(classnames)} classnames given but {source.path} has "
            f"{len(folder_names)} class folders ({', '.join(folder_names)})"
        )
    return items, labels, classnames


def load_task(task) -> LoadedTask:
    """The task's images (and captions, prompts or labels), errors naming the task and the bad input."""
    try:
        if isinstance(task, RetrievalTask):
            items, captions, caption_image = load_retrieval(task)
            return LoadedTask(task, [ImageSet(task.dataset, items)], captions=captions, caption_image=caption_image)
        if isinstance(task, ZeroShotTask):
            items, labels, classnames = load_zeroshot(task)
            return LoadedTask(task, [ImageSet(task.dataset, items, labels)], classnames=classnames,
                              templates=get_templates(task.templates), n_classes=len(classnames))
        return _load_probe(task)
    except ValueError as e:
        raise EvalDataError(f"task {task.dataset!r} ({task.task}): {e}") from None
