"""The package version, in a module of its own: the modules that record it (sidecars, the download User-Agent,
``simulation.json``) import it from here, not from the package root, which imports the public API and would
make every one of them part of an import cycle.
"""

__version__ = "0.1.0"
