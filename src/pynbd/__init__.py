"""pynbd: a network block device stack in Python."""

#: the version, in one place: pyproject.toml reads it from here (dynamic version), and
#: `pynbd --version` prints it; CHANGELOG.md says what changed in each
__version__ = "0.1.0"
