"""Layer 2 (beside ``cmkit.models`` and ``cmkit.latent``; imports only ``cmkit.core``): the data pipeline. Datasets
by ``data.name`` (``DATASETS``: 2-D sets, digits, tinted digits, Fashion-MNIST, coloured Fashion-MNIST with prompts);
the ``data.path`` formats (``PATH_FORMATS``: ``.npy`` files, image folders, captioned image folders, webdataset
shards, captioned video clips; a new one is a module registering a ``PathFormat``); captioned sets streamed from
shards (``CAPTION_STREAMS``: Hugging Face datasets); captioned images as shards and the on-disk latent cache they
are encoded into, by encoders handed in (``caption_sources``, ``latent_cache``); image files for the command line.
Importing this package registers every set and format."""

from . import (  # noqa: F401
    captions,
    fashion_colours,
    hf_captions,
    image_folders,
    images,
    moving_fashion,
    npy_files,
    tar_shards,
    toy2d,
    video_clips,
)
from .caption_streams import CAPTION_STREAMS, StreamedCaptions
from .dataset import DATASETS, TEST_SEED, TRAIN_SEED, Dataset
from .formats import PATH_FORMATS, PathFormat, PathOptions, open_path
from .image_folders import load_image_folder
from .images import FASHION_DIR, TINT_COPIES, load_digits, load_fashion_mnist, tint
from .loading import dataset_names, load_dataset, open_dataset
from .npy_files import load_npy
from .toy2d import TWO_D

__all__ = ["CAPTION_STREAMS", "DATASETS", "FASHION_DIR", "PATH_FORMATS", "TEST_SEED", "TINT_COPIES", "TRAIN_SEED",
           "TWO_D", "Dataset", "PathFormat", "PathOptions", "StreamedCaptions", "dataset_names", "load_dataset",
           "load_digits", "load_fashion_mnist", "load_image_folder", "load_npy", "open_dataset", "open_path", "tint"]
