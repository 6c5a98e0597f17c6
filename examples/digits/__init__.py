"""sklearn digits, split across silos: the example job of ``dags/digits.yaml``."""
