"""Job specs on the Airflow side: read YAML files into the pydantic models of ``fl_tasks.spec``.

``load_spec`` / ``parse_spec_text`` report every problem as ``file:line: field.path: message``;
``find_specs`` lists the spec files of a DAGs folder.
"""

from airfed.spec.loader import Problem, SpecError, find_specs, load_spec, parse_spec_text

__all__ = ["Problem", "SpecError", "find_specs", "load_spec", "parse_spec_text"]
