"""segcli: instance segmentation masks for folders of images and videos."""

__version__ = "0.1.0"
