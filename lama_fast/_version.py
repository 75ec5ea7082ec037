"""The package version: setup.py reads it, and ``lama-fast --version`` falls back to it when the
package runs from a source tree without being installed."""
__version__ = "0.1.0"
