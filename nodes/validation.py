"""Queue-time checks of a node's widget values (the node schema's `validate_inputs`), so that a bad prompt is refused
at /prompt, before anything of a queued batch runs.

ComfyUI checks a widget value against its min, max and options when a prompt is queued, but a comparison with NaN is
false, so NaN passes (and inf passes an input with no bound); and ComfyUI skips those checks altogether for every
input that a node's `validate_inputs` takes. `check_widgets` therefore does all of them again for every widget value
it is given, NaN and inf included, and node-specific rules that need no model (e.g. the order of a sigma range) are
added by the node. Linked inputs carry no value at queue time and are left to the node's run-time checks. A value
that is no number where a number belongs is left to ComfyUI, which refuses it itself ("Failed to convert an input
value to a FLOAT value", under that input).

ComfyUI files a `validate_inputs` refusal under every input the function takes (all of them, for `**values`), so the
frontend would mark every socket of the node. `file_under_inputs` wraps ComfyUI's own `execution.validate_inputs` so
that each problem of a pack node is filed under the inputs it concerns only; without it the refusal is the same, only
filed under every input.
"""

import functools
import math
import os
from typing import Callable, NamedTuple

from comfy_api.latest import io

from ..guiders.sigma_range import check_sigma_range


class Rule(NamedTuple):
    """A node's own queue-time check: `check(values)` returns a problem or None; a problem concerns `inputs` (ComfyUI
    files it under each of them)."""
    inputs: tuple[str, ...]
    check: Callable[[dict], "str | None"]


class Refusal(str):
    """A refused node's message, naming the node and every problem, for ComfyUI; it also keeps each problem with the
    inputs it concerns (`under`), for `file_under_inputs`."""

    def __new__(cls, node_name: str, problems: list[tuple[tuple[str, ...], str]]):
        refusal = super().__new__(cls, message(node_name, [text for _, text in problems]))
        refusal.node_name, refusal.problems = node_name, problems
        return refusal

    def under(self, input_name: str) -> str | None:
        """The message of the problems that concern `input_name`, or None."""
        texts = [text for inputs, text in self.problems if input_name in inputs]
        return message(self.node_name, texts) if texts else None


def message(node_name: str, problems: list[str]) -> str:
    """The text of a refusal: '<the node's display name>: <problem>; <problem>.'"""
    return f"{node_name}: " + "; ".join(problems) + "."


NUMBER_INPUTS = (io.Float.Input, io.Int.Input)


def converted(spec, value) -> bool:
    """Whether ComfyUI converted `value` to the number type of input `spec` (it leaves a value it cannot convert, such
    as text, or NaN or inf for an INT input, as it came, and refuses it under that input)."""
    return isinstance(value, int) if isinstance(spec, io.Int.Input) else isinstance(value, (int, float))


def widget_problems(schema: io.Schema, values: dict) -> list[tuple[tuple[str, ...], str]]:
    """What is wrong with each widget value of `values` against its declaration in `schema`, with its input."""
    problems = []
    for spec in schema.inputs:
        if values.get(spec.id) is None:
            continue
        value = values[spec.id]
        # the label the user sees, and the name an API prompt uses where the two differ (CFG++'s lambda)
        name = spec.id if spec.display_name in (None, spec.id) else f"{spec.display_name} ({spec.id})"
        if isinstance(spec, NUMBER_INPUTS):
            bounds = f"between {spec.min:g} and {spec.max:g}" if spec.min is not None and spec.max is not None else ""
            if not math.isfinite(value):
                problems.append(((spec.id,), f"{name} is {value}: enter a finite number {bounds} "
                                 f"(default {spec.default:g})"))
            elif spec.min is not None and value < spec.min or spec.max is not None and value > spec.max:
                problems.append(((spec.id,), f"{name} is {value:g}: enter a number {bounds} "
                                 f"(default {spec.default:g})"))
        elif isinstance(spec, io.Combo.Input) and value not in spec.options:
            problems.append(((spec.id,), f"{name} is {value!r}: choose one of {', '.join(map(str, spec.options))}"))
    return problems


def check_widgets(node: type[io.ComfyNode], values: dict, *rules: Rule) -> "bool | Refusal":
    """True, or a `Refusal` naming the node (as the user sees it) and every problem: the widget checks, then each of
    `rules` (whose functions are called only when the values they read are present).

    A number input whose value ComfyUI could not convert is left out (as if linked): ComfyUI refuses it itself."""
    schema = node.define_schema()  # GET_SCHEMA would cache it on the class, which ComfyUI locks while validating
    unconverted = {spec.id for spec in schema.inputs if isinstance(spec, NUMBER_INPUTS)
                   and values.get(spec.id) is not None and not converted(spec, values[spec.id])}
    values = {k: None if k in unconverted else v for k, v in values.items()}
    problems = widget_problems(schema, values)
    if not problems:
        problems = [(rule.inputs, problem) for rule in rules if (problem := rule.check(values))]
    return Refusal(schema.display_name, problems) if problems else True


def file_under_inputs(validate_inputs, pack_nodes: dict):
    """ComfyUI's `execution.validate_inputs(prompt_id, prompt, item, validated, ...)`, with the refusal of a node of
    `pack_nodes` ({node id: class}) filed under the inputs each of its problems concerns instead of under every input.

    ComfyUI records a `validate_inputs` refusal as one error per input, each with the same text; the pack's node is
    asked again for its `Refusal` on the same values, and each error keeps only the problems of its own input (an
    error whose input no problem concerns is dropped). Other errors, and other nodes, are left as ComfyUI made them.
    """
    @functools.wraps(validate_inputs)
    async def validate_and_file(prompt_id, prompt, item, validated, *args, **kwargs):
        result = await validate_inputs(prompt_id, prompt, item, validated, *args, **kwargs)
        node = pack_nodes.get(prompt[item]["class_type"])
        errors = result[1]
        custom = [e for e in errors if e.get("type") == "custom_validation_failed"]
        if node is None or not custom:
            return result
        # the values ComfyUI gave validate_inputs: the widget values it converted in place, links as None
        refusal = node.validate_inputs(**{k: None if isinstance(v, list) else v
                                          for k, v in prompt[item]["inputs"].items()})
        if not isinstance(refusal, Refusal):
            return result
        filed = []
        for error in custom:
            name = error.get("extra_info", {}).get("input_name")
            if (text := refusal.under(name)) is not None:
                filed.append(error | {"details": f"{name} - {text}"})
        if filed:  # never lose a refusal, whatever ComfyUI filed it under
            errors[:] = [e for e in errors if e not in custom] + filed
        return result

    validate_and_file.pack_nodes = pack_nodes
    return validate_and_file


def install_filing(pack_nodes: list[type[io.ComfyNode]]) -> None:
    """Wraps ComfyUI's `execution.validate_inputs` with `file_under_inputs` for `pack_nodes` (once per server)."""
    import execution

    by_id = {node.define_schema().node_id: node for node in pack_nodes}
    if hasattr(execution.validate_inputs, "pack_nodes"):
        execution.validate_inputs.pack_nodes.update(by_id)
    else:
        execution.validate_inputs = file_under_inputs(execution.validate_inputs, by_id)


def sigma_range_problem(values: dict) -> str | None:
    """sigma_start >= sigma_end."""
    if values.get("sigma_start") is None or values.get("sigma_end") is None:
        return None
    try:
        check_sigma_range(values["sigma_start"], values["sigma_end"])
    except ValueError as e:
        return f"{e}: set sigma_start >= sigma_end (sigma falls during sampling; the node acts between the two)"
    return None


def filename_problem(values: dict) -> str | None:
    """`filename` is a plain file name, no folders."""
    name = values.get("filename")
    if name is not None and (not name.strip() or os.sep in name or "/" in name or name.startswith(".")):
        return f"filename is {name!r}: give a plain file name, no folders"
    return None


# The rules of every node with a sigma range, and of every node that saves a file.
SIGMA_RANGE_RULE = Rule(("sigma_start", "sigma_end"), sigma_range_problem)
FILENAME_RULE = Rule(("filename",), filename_problem)


def prefixed(node_name: str, error: Exception) -> Exception:
    """`error` (of its own type) with its message starting with the node's display name, as every run-time refusal
    names its node as the user sees it (messages raised deeper in the pack may carry it already)."""
    message = str(error)
    return type(error)(message if message.startswith(node_name) else f"{node_name}: {message}")
