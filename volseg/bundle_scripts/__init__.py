"""Code that is copied into a bundle's own ``scripts/`` package.

Modules here import only torch and monai, so that a bundle runs where volseg is not installed.
"""
