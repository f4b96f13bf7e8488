"""Stage two: the fully connected CRF on one image and on many, and its parameter search."""
