"""The version of loraq, in one place: the package, reports and file metadata read it."""

__version__ = "0.1.0"
