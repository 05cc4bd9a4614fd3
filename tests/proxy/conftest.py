from tests.migration.conftest import procs

__all__ = ["procs"]
