"""The training engine. Importing this package does not import torch; submodules do."""
from trainers.reproducible_blas import prefer_reproducible_blas

prefer_reproducible_blas()  # before torch's first BLAS call in any process that trains
