"""Each bundle end to end with tiny models, the shipped models on real CT, lungseg and the bundles' metadata."""
