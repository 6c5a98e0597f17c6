"""Moved to :mod:`airfed.spec`; kept only for ``airfed.offline`` until it imports from there."""

from airfed.spec import Problem, SpecError, find_specs, load_spec, parse_spec_text

__all__ = ["Problem", "SpecError", "find_specs", "load_spec", "parse_spec_text"]
