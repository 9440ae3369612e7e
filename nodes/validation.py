"""Queue-time checks of a node's widget values (the node schema's `validate_inputs`), so that a bad prompt is refused
at /prompt, before anything of a queued batch runs.

ComfyUI checks a widget value against its min, max and options when a prompt is queued, but a comparison with NaN is
false, so NaN passes (and inf passes an input with no bound); and ComfyUI skips those checks altogether for every
input that a node's `validate_inputs` takes. `check_widgets` therefore does all of them again for every widget value
it is given, NaN and inf included, and node-specific rules that need no model (e.g. the order of a sigma range) are
added by the node. Linked inputs carry no value at queue time and are left to the node's run-time checks.
"""

import math
import os

from comfy_api.latest import io

from ..guiders.sigma_range import check_sigma_range


def widget_problems(schema: io.Schema, values: dict) -> list[str]:
    """What is wrong with each widget value of `values` against its declaration in `schema`."""
    problems = []
    for spec in schema.inputs:
        if spec.id not in values or values[spec.id] is None:
            continue
        value = values[spec.id]
        # the label the user sees, and the name an API prompt uses where the two differ (CFG++'s lambda)
        name = spec.id if spec.display_name in (None, spec.id) else f"{spec.display_name} ({spec.id})"
        if isinstance(spec, (io.Float.Input, io.Int.Input)):
            bounds = f"between {spec.min:g} and {spec.max:g}" if spec.min is not None and spec.max is not None else ""
            if not math.isfinite(value):
                problems.append(f"{name} is {value}: enter a finite number {bounds} (default {spec.default:g})")
            elif spec.min is not None and value < spec.min or spec.max is not None and value > spec.max:
                problems.append(f"{name} is {value:g}: enter a number {bounds} (default {spec.default:g})")
        elif isinstance(spec, io.Combo.Input) and value not in spec.options:
            problems.append(f"{name} is {value!r}: choose one of {', '.join(map(str, spec.options))}")
    return problems


def check_widgets(node: type[io.ComfyNode], values: dict, *rules) -> bool | str:
    """True, or one message naming the node and every problem: the widget checks, then each of `rules`, a function
    of the widget values that returns a problem or None (it is called only when the values it reads are present)."""
    schema = node.define_schema()  # GET_SCHEMA would cache it on the class, which ComfyUI locks while validating
    problems = widget_problems(schema, values)
    if not problems:
        problems = [p for p in (rule(values) for rule in rules) if p]
    if not problems:
        return True
    return f"{schema.display_name}: " + "; ".join(problems) + "."


def sigma_range_rule(values: dict) -> str | None:
    """The rule of every node with a sigma range: sigma_start >= sigma_end."""
    if values.get("sigma_start") is None or values.get("sigma_end") is None:
        return None
    try:
        check_sigma_range(values["sigma_start"], values["sigma_end"])
    except ValueError as e:
        return f"{e}: set sigma_start >= sigma_end (sigma falls during sampling; the node acts between the two)"
    return None


def filename_rule(values: dict) -> str | None:
    """The rule of every node that saves a file: `filename` is a plain file name, no folders."""
    name = values.get("filename")
    if name is not None and (not name.strip() or os.sep in name or "/" in name or name.startswith(".")):
        return f"filename is {name!r}: give a plain file name, no folders"
    return None


def prefixed(node_id: str, error: Exception) -> Exception:
    """`error` (of its own type) with its message starting with the node's id, as every run-time refusal names its node
    (messages raised deeper in the pack may carry it already)."""
    message = str(error)
    return type(error)(message if message.startswith(node_id) else f"{node_id}: {message}")
