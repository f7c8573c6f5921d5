"""The release of this package (read by pyproject.toml and written into every manifest)."""
__version__ = "0.2.0"
