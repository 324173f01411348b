"""Data loading and federated partitioning."""
from .datasets import (DEFAULT_DATASET_NOTE, IMAGE_EXTENSIONS, ArrayDataset, load_digits,  # noqa: F401
                       load_image_folder, load_npz)
from .partition import partition_dirichlet, partition_iid  # noqa: F401
from .splits import FedData, prepare_data  # noqa: F401
