"""End-to-end experiments, selected with ``recipe=NAME`` (a package so that they ship in the wheel)."""
