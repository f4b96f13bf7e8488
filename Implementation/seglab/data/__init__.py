"""Data: reading and checking images and labels, the data sets behind one interface, transforms,
loaders; how predicted labels are scored (metrics.py) and the network outputs kept on disk for
stage two (logit_cache.py)."""
