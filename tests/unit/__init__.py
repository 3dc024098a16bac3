"""Fast tests of the library: readers, QC, transforms, phantom, networks, metrics, docs and layout (about a minute)."""
