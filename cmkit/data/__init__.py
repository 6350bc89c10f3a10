"""Layer 6: datasets (a registry by ``data.name``: 2-D sets, digits, tinted digits, Fashion-MNIST; ``.npy`` files and
image folders by ``data.path``; captioned sets streamed from webdataset tars or Hugging Face datasets) and image files
for the command line. Importing this package registers every set."""

from . import fashion_colours, hf_captions, images, tar_shards, toy2d  # noqa: F401  (each registers its sets)
from .caption_streams import CAPTION_STREAMS, StreamedCaptions, open_caption_stream
from .dataset import DATASETS, TEST_SEED, TRAIN_SEED, Dataset, dataset_names, load_dataset, load_npy
from .images import FASHION_DIR, TINT_COPIES, load_digits, load_fashion_mnist, load_image_folder, tint
from .toy2d import TWO_D

__all__ = ["CAPTION_STREAMS", "DATASETS", "FASHION_DIR", "TEST_SEED", "TINT_COPIES", "TRAIN_SEED", "TWO_D", "Dataset",
           "StreamedCaptions", "dataset_names", "load_dataset", "load_digits", "load_fashion_mnist",
           "load_image_folder", "load_npy", "open_caption_stream", "tint"]
