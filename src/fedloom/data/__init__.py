"""Data sets for federated experiments: containers, loaders, downloads and partitioners.

Loaders return `ArrayDataset` pairs (centralised data: MNIST, Fashion-MNIST, scikit-learn sets)
or a `FederatedDataset` (naturally partitioned data: FEMNIST by writer, Shakespeare by role).
Centralised data is split among simulated clients with the seeded partitioners in
`fedloom.data.partition` (`iid`, `dirichlet`, `shards`, `quantity_skew`, `natural`), which
return one index array per client for `ArrayDataset.subset`.
"""

from fedloom.data.datasets import (
    ENV_VAR,
    ArrayDataset,
    CorruptDataError,
    DatasetNotFoundError,
    FederatedDataset,
    data_dir,
    load_fashion_mnist,
    load_femnist,
    load_mnist,
    load_sklearn,
)
from fedloom.data.download import ChecksumError, DownloadError, download
from fedloom.data.partition import dirichlet, iid, natural, quantity_skew, shards
from fedloom.data.shakespeare import ALL_LETTERS, load_shakespeare

__all__ = [
    "ALL_LETTERS",
    "ENV_VAR",
    "ArrayDataset",
    "ChecksumError",
    "CorruptDataError",
    "DatasetNotFoundError",
    "DownloadError",
    "FederatedDataset",
    "data_dir",
    "dirichlet",
    "download",
    "iid",
    "load_fashion_mnist",
    "load_femnist",
    "load_mnist",
    "load_shakespeare",
    "load_sklearn",
    "natural",
    "quantity_skew",
    "shards",
]
