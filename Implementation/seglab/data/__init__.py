"""Data: reading and checking images and labels, the data sets behind one interface, transforms, loaders."""
