"""Code that is copied into a bundle's own ``scripts/`` package.

Modules here import only torch, monai, numpy and scipy (MONAI's own dependencies and the bundle's), so that a
bundle runs where volseg is not installed.
"""
