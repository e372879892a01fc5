"""Training data through 🤗 `datasets`, the way diffusers' training scripts read it.

A name is a Hub dataset id (``user/name``), a local folder that ``datasets.load_dataset`` reads
(images with an optional ``metadata.jsonl``, parquet/csv/json files) or a folder written by
``save_to_disk``. :func:`source_problem` says cheaply (nothing downloaded, no image decoded) why
a source cannot be opened, so a training script can refuse it before it loads any model.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from .extras import import_extra

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
DATASETS_HINT = 'needs the `datasets` package: pip install "sami-adapter[train]" (or pip install datasets)'


def _datasets():
    """The `datasets` package, or an ImportError that names the extra installing it."""
    return import_extra("datasets", "Reading a `datasets` dataset")


def is_saved_dataset(path: str) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


def hub_offline() -> bool:
    """Whether `datasets` will not contact the Hub (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE, as it read them on import)."""
    return bool(_datasets().config.HF_HUB_OFFLINE)


def source_problem(name: str, config: Optional[str] = None, cache_dir: Optional[str] = None, timeout: float = 10.0) -> Optional[str]:
    """Why the dataset ``name`` cannot be opened, as one sentence; None when it can.

    Cheap: a local folder is only resolved (its data files listed), a Hub id is looked up once with
    ``timeout`` seconds (no retries, so an unreachable Hub is reported within that time); in offline
    mode only the local cache is consulted.
    """
    try:
        import datasets
    except ImportError:
        return f"reading {name!r} {DATASETS_HINT}"
    if is_saved_dataset(name):
        return None
    if os.path.exists(name):
        if not os.path.isdir(name):
            return f"{name!r} is a file; pass a folder (of images, or of parquet/csv/json files) or a Hub dataset id"
        return _builder_problem(datasets, name, config, cache_dir, local=True)
    if not HUB_ID.match(name):
        return f"{name!r} is neither an existing folder nor a Hub dataset id (user/name)"
    if hub_offline():
        return _builder_problem(datasets, name, config, cache_dir, local=False)
    return _hub_problem(name, timeout)


def _builder_problem(datasets, name, config, cache_dir, local: bool) -> Optional[str]:
    try:
        datasets.load_dataset_builder(name, config, cache_dir=cache_dir)
    except Exception as e:  # datasets raises many types here (FileNotFoundError, ValueError, ConnectionError, ...)
        if config is not None and "BuilderConfig" in str(e):
            return f"{name!r} has no configuration {config!r} ({e})"
        if local:
            return (f"`datasets` cannot read the folder {name!r} ({type(e).__name__}: {e}); pass a folder of images (an optional "
                    "metadata.jsonl adds columns), a folder of parquet/csv/json files, or one written by save_to_disk")
        return (f"{name!r} is not in the local datasets cache and the Hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) "
                f"({type(e).__name__}); load it once online, or pass a local folder")
    return None


def _hub_problem(name: str, timeout: float) -> Optional[str]:
    from huggingface_hub import HfApi
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(name, timeout=timeout)
    except GatedRepoError:
        return f"the Hub dataset {name!r} is gated: accept its terms on the Hub and log in (huggingface-cli login)"
    except RepositoryNotFoundError:
        return f"there is no dataset {name!r} on the Hub (or it is private: log in with huggingface-cli login); check the id"
    except Exception as e:  # no connection, DNS failure, timeout, proxy error
        return (f"could not reach the Hub to find {name!r} ({type(e).__name__}); check the connection, or pass a local folder, "
                "or set HF_DATASETS_OFFLINE=1 to use a cached copy")
    return None


def load_split(name: Optional[str] = None, data_dir: Optional[str] = None, config: Optional[str] = None,
               cache_dir: Optional[str] = None, split: str = "train"):
    """The ``split`` of a dataset as a ``datasets.Dataset``.

    Args:
        name: a Hub id, a folder ``datasets.load_dataset`` reads, or a ``save_to_disk`` folder (detected).
        data_dir: instead of ``name``, a folder of images read with the ``imagefolder`` builder (so a
            ``metadata.jsonl`` beside the images adds caption and other columns).
        config: the dataset's configuration name, if it has several.
        cache_dir: where `datasets` keeps downloads and prepared files.
        split: the split to return when the dataset has several (a single split is returned as it is).
    """
    datasets = _datasets()
    if data_dir is not None:
        loaded = datasets.load_dataset("imagefolder", data_dir=data_dir, cache_dir=cache_dir)
    elif is_saved_dataset(name):
        loaded = datasets.load_from_disk(name)
    else:
        loaded = datasets.load_dataset(name, config, cache_dir=cache_dir)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            if len(loaded) != 1:
                raise ValueError(f"the dataset has no {split!r} split (splits: {', '.join(loaded)})")
            split = next(iter(loaded))
        loaded = loaded[split]
    return loaded


class Column:
    """One column of a ``datasets.Dataset``, read one row at a time (a whole column would decode every image).

    Image columns are read undecoded (``{"path", "bytes"}``), so the training code decodes them itself
    and names the file in its error message when one is broken.
    """

    def __init__(self, dataset, column: str):
        datasets = _datasets()
        dataset = dataset.select_columns([column])
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[int(index)][self.column]
