"""The generated part of the nodes' help pages (`web/docs/<node id>/en.md`, shown in the frontend's Node Info tab): the
inputs and outputs tables, rendered from a node's schema as ComfyUI reports it (`INPUT_TYPES()`, `RETURN_TYPES`,
`RETURN_NAMES`, the form `/object_info` serves). tests/test_help_pages.py checks every page against it and prints the
tables to paste when one differs.
"""

import re

HELP_PAGES = "web/docs"
# The frontend asks for `docs/<node id>/<locale>.md` first and `docs/<node id>.md` only after a 404: pages live at the
# first address (English, the only locale written), so a node's help loads with no failed request.
PAGE = "{node_id}/en.md"


def page_path(node_id: str) -> str:
    """A node's help page, relative to the repository."""
    return f"{HELP_PAGES}/{PAGE.format(node_id=node_id)}"
BEGIN = "<!-- inputs and outputs: generated from the node's schema (scripts/help_pages.py); tests/test_help_pages.py checks them -->"
END = "<!-- end inputs and outputs -->"
# The headings every page has, in this order (other headings may sit between them).
REQUIRED_HEADINGS = ["## When to use it", "## Inputs", "## Outputs", "## Paper", "## Measured"]


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _number(value) -> str:
    return repr(value) if isinstance(value, float) and value != int(value) else str(value).removesuffix(".0")


def _input_row(name: str, spec, optional: bool) -> str:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    label = f"`{name}`"
    if options.get("display_name", name) != name:
        label += f" (shown as {options['display_name']})"
    kind = "COMBO" if isinstance(kind, (list, tuple)) else kind
    shown_kind = f"{kind}, optional" if optional else kind
    default = options.get("default")
    default = "" if default is None else f"`{_number(default) if kind in ('INT', 'FLOAT') else default}`"
    span = f"{_number(options['min'])} to {_number(options['max'])}" if "min" in options and "max" in options else ""
    if "tooltip" not in options:
        raise ValueError(f"input {name} has no tooltip")
    return f"| {label} | {shown_kind} | {_cell(default)} | {span} | {_cell(options['tooltip'])} |"


def generated_section(input_types: dict, return_types, return_names) -> str:
    """The marked block of a page: its `## Inputs` table (required inputs, then optional ones; hidden inputs are the
    host's) and its `## Outputs` table."""
    rows = [_input_row(name, spec, section == "optional")
            for section in ("required", "optional") for name, spec in input_types.get(section, {}).items()]
    names = list(return_names or return_types)
    outputs = [f"| `{name}` | {kind} |" for name, kind in zip(names, return_types)]
    return "\n".join([
        BEGIN, "", "## Inputs", "",
        "| input | type | default | range | meaning |", "| --- | --- | --- | --- | --- |", *rows, "",
        "## Outputs", "", "| output | type |", "| --- | --- |", *(outputs or ["| (none) | |"]), "", END,
    ])


def page_section(page: str) -> str | None:
    """The marked block as it stands in a page, or None."""
    match = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), page, re.S)
    return match[0] if match else None
