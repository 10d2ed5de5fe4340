"""FUSE mount: a pyfuse3 adapter that translates kernel requests into kvfs.Client calls."""
