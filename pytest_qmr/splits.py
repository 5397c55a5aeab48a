"""A benchmark's non-evaluation split, read the way its evaluation split is: through lm-eval.

One reader for the GSM8K training problems of Restore (:mod:`pytest_qmr.restore.problems`) and
the GSM8K calibration set (:mod:`pytest_qmr.calibration`). The task is built with lm-eval's
``TaskManager`` exactly as a cell builds it (:func:`pytest_qmr.measure.task_manager`: our task
folder, the data dir in ``metadata``), and the split comes from the task itself:
``task.training_docs()`` is the split the task's YAML names as ``training_split``
(``tasks/qmr_gsm8k.yaml``: ``train``), ``task.test_docs()`` its ``test_split``. Docs are the
task's normalized docs (the file's own fields plus ``qmr_id``, ``qmr_gold``, ``qmr_kind``,
``qmr_question``), in file order.

The loader is asked for that one split alone (``metadata.qmr_splits``), so a data dir holding
only ``gsm8k/train.jsonl`` is enough. A data dir is authoritative: when one is given, the split's
file (``local``, relative to it) must be there; its absence is a :class:`MissingSplitFile` naming
the path, never a silent hub download. Only with no data dir at all does the task's loader fall
back on the hub. A file that is not UTF-8 or not JSON lines is a one-line ``DataError`` naming
it (catch it as :class:`pytest_qmr.errors.QmrError`: lm-eval imports ``tasks/utils.py`` as a
module of its own, so its ``DataError`` is not ``pytest_qmr.tasks.utils.DataError``).
"""

from __future__ import annotations

from pathlib import Path

from .errors import QmrError

SPLIT_DOCS = {"train": "training_docs", "test": "test_docs"}


class MissingSplitFile(QmrError, FileNotFoundError):
    """A data dir without the split's file; ``path`` is the file, ``data_dir`` and ``local`` what was asked."""

    def __init__(self, path: Path, data_dir: Path, local: Path) -> None:
        super().__init__(f"{path} not found (data dir {data_dir} has no {local})")
        self.path, self.data_dir, self.local = path, data_dir, local


def task_docs(task: str, data_dir: Path | None, split: str = "train", local: str | Path | None = None,
              ) -> tuple[list[dict], str]:
    """(docs, source) of ``split`` of the lm-eval ``task``: ``source`` is the local file
    (``data_dir / local``) when a data dir is given, else ``hub`` (the task's own fallback)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from .measure import task_manager, tasks_dir
    from .taskfiles import building

    if split not in SPLIT_DOCS:
        raise ValueError(f"split must be one of {', '.join(SPLIT_DOCS)} (got {split!r})")
    source = "hub"
    if data_dir is not None and local is not None:
        path = Path(data_dir) / local
        if not path.is_file():
            raise MissingSplitFile(path, Path(data_dir), Path(local))
        source = str(path)
    manager = task_manager(Path(data_dir) if data_dir is not None else None, {"qmr_splits": split})
    entry = manager.task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise ValueError(f"{task}: not a YAML task of {tasks_dir()}")
    config = load_yaml(entry.yaml_path, resolve_func=True)
    if split == "train" and config.get("training_split") is None:
        raise ValueError(f"{task}: its YAML names no training_split")
    # the task's own YAML with the one split loaded: lm-eval checks a doc of its test split (and
    # reads its training split for few-shot examples) when it builds the task
    config = {**config, "training_split": split if split == "train" else None, "validation_split": None,
              "test_split": config["training_split"] if split == "train" else split}
    with building(task, manager):
        built = manager.load([config])["tasks"][task]
        return [dict(doc) for doc in getattr(built, SPLIT_DOCS[split])()], source
