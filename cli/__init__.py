"""The ``annsample`` command line: thin click wrappers over the library."""
