"""The training engine. Importing this package does not import torch; submodules do."""
