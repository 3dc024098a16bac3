"""Shared package for the lung CT foundation-model bundles: io, qc, transforms, networks, text, phantom."""

__version__ = "0.1.0"
