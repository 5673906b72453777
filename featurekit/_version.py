"""featurekit's version, in a module of its own: the package's modules import it from here, never
from the package root (the import contracts forbid that)."""

__version__ = "0.2.0"
