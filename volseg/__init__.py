"""volseg: 3D and 2D medical image segmentation on MONAI.

YAML recipes, Ignite training with DiceCE, sliding-window inference back to the input grid, and a MONAI bundle
at the end of every training run.
"""

__version__ = "0.2.0"
