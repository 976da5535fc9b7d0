"""rehamot: motion<->text retrieval with DropTriple over the global batch."""
__version__ = "0.1.0"
