"""Filters: layers between the server and a plugin (see base.py and docs/plugins.md)."""

from pynbd.filters.base import Admission, Filter, Verdict

__all__ = ["Admission", "Filter", "Verdict"]
