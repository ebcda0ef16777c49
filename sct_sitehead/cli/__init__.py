"""The two command-line tools: thin layers over the Python API."""
