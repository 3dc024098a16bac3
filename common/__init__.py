"""Shared package for the lung CT foundation-model bundles: io, qc, transforms, networks, text, phantom."""

from common.runtime import keep_freed_memory

__version__ = "0.1.0"

# every entry point (bundle configs, CLI, server, tests) imports common first: see common/runtime.py
keep_freed_memory()
