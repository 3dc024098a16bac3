"""Applications built on the library (the house-in-order layout: apps apart from library code)."""
