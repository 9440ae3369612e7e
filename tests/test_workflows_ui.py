"""The shipped UI workflows load in the ComfyUI frontend: a consistent LiteGraph graph whose every node and widget
value the running server accepts, equal to the shipped API workflow, with real-world settings for the CFG-vs-APG
and FreCaS-vs-CFG comparisons and the bench's settings for the PPAP workflows, laid out with room for any font. Widget
values are checked against the server's /object_info, in the order the frontend assigns them."""

import json
import re

import pytest
from test_e2e_server import API_DIR, API_WORKFLOWS, APG, UI_WORKFLOWS, WORKFLOWS, load

# The frontend makes widgets of these input types (a list is a combo) and a socket of anything else.
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_CONTROLS = {"fixed", "increment", "decrement", "randomize"}
# The frontend adds a control_after_generate widget to an INT input named so when the node does not say (Train AGD
# Adapters' seed).
SEED_NAMES = {"seed", "noise_seed"}
# Frontend-only nodes, which the server does not know and graphToPrompt leaves out: a workflow's notes.
VIRTUAL_NODES = {"Note"}
# The CFG-vs-APG comparisons and what each must look like: checkpoint, image size, cfg.
APG_COMPARISONS = {
    "APG vs CFG (SD1.5)": ("v1-5-pruned-emaonly.safetensors", 512, 7.0),
    "APG vs CFG (SDXL)": ("sd_xl_base_1.0.safetensors", 1024, 15.0),
}
# The FreCaS-vs-CFG comparisons: checkpoint (None: the reference model's loader), first-stage size, the FreCaS
# settings (steps, stage_ends, gamma, cfg, cfg_high, attention_fusion, sampler) and the two scale_by values; the plain
# KSampler runs directly at the larger one's size with the same cfg, sampler and total step count.
FRECAS = "GuidanceFreCaSSampler"
FRECAS_COMPARISONS = {
    "FreCaS vs CFG (SD1.5)": ("v1-5-pruned-emaonly.safetensors", 512,
                              ("40, 10", "100, 0", 3.0, 7.5, 45.0, 0.6, "ddim"), (1.41, 2.0)),
    "FreCaS vs CFG (SDXL)": ("sd_xl_base_1.0.safetensors", 1024,
                             ("40, 10", "200, 0", 1.5, 7.5, 35.0, 0.6, "ddim"), (1.41, 2.0)),
    "FreCaS vs CFG (reference model)": (None, 32, ("20, 10", "100, 0", 1.0, 4.0, 4.0, 0.9, "euler"), (2.0, 4.0)),
}
FRECAS_SETTINGS = ("steps", "stage_ends", "gamma", "cfg", "cfg_high", "attention_fusion", "sampler_name")
# Room in the layouts. The frontend draws text in the fonts the machine has (Arial is DejaVu Sans on a bare Debian,
# later frontends draw Inter) and grows a node that its title does not fit, so a layout fitted to one browser's text
# makes nodes overlap in another. The saved layouts leave room instead; tests/test_frontend_browser.py checks what a
# browser draws of them.
LAYOUT_GAP_PX = 24  # at least this between two nodes (title bars included) and between a node and a group's title bar
NODE_TITLE_PX = 30  # LiteGraph's NODE_TITLE_HEIGHT: a node's title bar, above its pos
GROUP_TITLE_EM = 1.4  # a group's title bar is this many times its font size high (LiteGraph's LGraphGroup)
NODE_TITLE_FONT_PX = 14  # LiteGraph's NODE_TEXT_SIZE
# LiteGraph's own estimate of a text's width (compute_text_size); on the shipped titles Chromium measured at most
# 0.63 em per character in DejaVu Sans and 0.60 in Inter, which TITLE_SPARE_PX absorbs.
TEXT_EM_PER_CHARACTER = 0.6
TITLE_PADDING_PX = NODE_TITLE_PX * 4 / 3  # LiteGraph's computeSize: the title's width plus the bar's height and a third
TITLE_SPARE_PX = 24  # beyond the estimate, for a wider font
GROUP_TITLE_PADDING_PX = 10  # LiteGraph draws a group's title a few pixels in from its left edge


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


def test_every_ui_workflow_has_an_api_twin():
    """The UI and API folders hold the same workflows, by file name."""
    assert [p.name for p in UI_WORKFLOWS] == [p.name for p in API_WORKFLOWS]
    assert set(APG_COMPARISONS) | set(FRECAS_COMPARISONS) <= {p.stem for p in UI_WORKFLOWS}


def separation(a, b):
    """How far apart rectangles [x, y, w, h] a and b are along the axis that separates them most (negative: they
    overlap)."""
    return max(b[0] - (a[0] + a[2]), a[0] - (b[0] + b[2]), b[1] - (a[1] + a[3]), a[1] - (b[1] + b[3]))


def title_width(title, font_px):
    """LiteGraph's estimate of the width of `title` drawn at `font_px`."""
    return TEXT_EM_PER_CHARACTER * font_px * len(title)


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_layout_leaves_slack(path, comfy):
    """On the saved layout, no browser needed: every node (title bar included) is LAYOUT_GAP_PX or more from every
    other node and from every group's title bar, so a node drawn up to that much larger still covers nothing; every
    node is wide enough for the title the frontend shows (its own, or else its type's display name) by LiteGraph's
    estimate with TITLE_SPARE_PX to spare, and every group for its title."""
    graph = load(path)
    titles = {f"node {n['id']}": n.get("title") or comfy.NODE_DISPLAY_NAME_MAPPINGS.get(n["type"], n["type"])
              for n in graph["nodes"]}
    nodes = {f"node {n['id']}": [n["pos"][0], n["pos"][1] - NODE_TITLE_PX, n["size"][0], n["size"][1] + NODE_TITLE_PX]
             for n in graph["nodes"]}
    group_titles = {f"group {g['title']!r}": [*g["bounding"][:3], GROUP_TITLE_EM * g.get("font_size", 24)]
                    for g in graph["groups"]}
    names = list(nodes)
    pairs = [(a, b, nodes[b]) for i, a in enumerate(names) for b in names[i + 1:]]
    pairs += [(a, f"the title bar of {b}", bar) for a in names for b, bar in group_titles.items()]
    close = [f"{a} ({titles[a]!r}) and {b}: {separation(nodes[a], rect):.0f} px apart" for a, b, rect in pairs
             if separation(nodes[a], rect) < LAYOUT_GAP_PX]
    assert close == [], f"{path.stem}: closer than {LAYOUT_GAP_PX} px"
    narrow = [f"{name} ({titles[name]!r}): {rect[2]} px wide, needs {need:.0f}" for name, rect in nodes.items()
              if rect[2] < (need := TITLE_PADDING_PX + title_width(titles[name], NODE_TITLE_FONT_PX) + TITLE_SPARE_PX)]
    narrow += [f"group {g['title']!r}: {g['bounding'][2]} px wide, needs {need:.0f}" for g in graph["groups"]
               if g["bounding"][2] < (need := GROUP_TITLE_PADDING_PX + TITLE_SPARE_PX
                                      + title_width(g["title"], g.get("font_size", 24)))]
    assert narrow == [], f"{path.stem}: too narrow for the title"


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_file_name_is_a_title(path):
    """The template browser titles a card with the file name, and shows it again as the description with - and _ as
    spaces (README, Workflows in ComfyUI): `<method> vs CFG (<model>)` or `<method> <task> (<model>)`, none of those
    two characters and none that Windows forbids in a file name."""
    assert re.fullmatch(r"[^-_\\/:*?\"<>|#%]+ \((SD1\.5|SDXL|SD3|reference model)\)", path.stem), path.stem


def declared_inputs(node_def):
    """[(name, type, options, is_widget)] of a node's inputs in the frontend's order (input_order: required, then
    optional); a combo's type is COMBO with its choices under options["options"]."""
    order = node_def.get("input_order") or {k: list(v) for k, v in node_def["input"].items()}
    declared = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            kind, options = (node_def["input"][section][name] + [{}])[:2]
            if isinstance(kind, list):
                kind, options = "COMBO", {**options, "options": kind}
            declared.append((name, kind, options, kind in WIDGET_TYPES and not options.get("forceInput")))
    return declared


def widget_inputs(node_def):
    """[(name, type, options)] of the inputs the frontend shows as widgets, in order."""
    return [(name, kind, options) for name, kind, options, is_widget in declared_inputs(node_def) if is_widget]


def widget_values(node, node_def):
    """{input name: value} from a node's widgets_values; a seed's control_after_generate value is checked and
    skipped, as the frontend does."""
    values = list(node["widgets_values"])
    named = {}
    for name, kind, options in widget_inputs(node_def):
        named[name] = values.pop(0)
        if options.get("control_after_generate", kind == "INT" and name in SEED_NAMES):
            assert values.pop(0) in SEED_CONTROLS, f"node {node['id']} {name}: control_after_generate"
    assert not values, f"node {node['id']} ({node['type']}) has widget values left over: {values}"
    return named


def check_value(where, value, kind, options):
    """The checks /prompt applies to a widget value, plus the type the frontend widget holds."""
    if kind == "COMBO":
        assert value in options["options"], f"{where}: {value!r} not among {options['options']}"
        return
    expected = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[kind]
    assert isinstance(value, expected) and (kind == "BOOLEAN" or not isinstance(value, bool)), f"{where}: {value!r}"
    if kind in ("INT", "FLOAT"):
        assert options.get("min", value) <= value <= options.get("max", value), f"{where}: {value} out of range"


def to_api(workflow, object_info):
    """The API-format prompt the frontend would queue for a UI workflow (all nodes active, no virtual nodes)."""
    prompt = {}
    links = {link[0]: link for link in workflow["links"]}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        node_def = object_info[node["type"]]
        inputs = widget_values(node, node_def)
        for socket in node["inputs"]:
            if socket.get("link") is not None:
                _, origin, slot, *_ = links[socket["link"]]
                inputs[socket["name"]] = [str(origin), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node_def["display_name"] or node["type"])}}
    return prompt


@pytest.fixture(params=UI_WORKFLOWS, ids=lambda p: p.stem)
def workflow(request):
    return request.param.stem, load(request.param)


def test_widget_values_fit_the_server(workflow, object_info):
    """Every node type exists and every widget value fits its input: type, min/max, combo options."""
    name, graph = workflow
    for node in graph["nodes"]:
        if node["type"] in VIRTUAL_NODES:  # a note: its text
            assert [type(v) for v in node["widgets_values"]] == [str] and not node["inputs"] + node["outputs"]
            continue
        assert node["type"] in object_info, f"{name}: unknown node type {node['type']}"
        node_def = object_info[node["type"]]
        values = widget_values(node, node_def)
        for input_name, kind, options in widget_inputs(node_def):
            check_value(f"{name} node {node['id']} {input_name}", values[input_name], kind, options)


def test_graph_is_consistent(workflow, object_info):
    """Links agree with both ends (ids, slots, types, names) and with /object_info; ids are unique and in range."""
    name, graph = workflow
    assert graph["version"] == 0.4 and isinstance(graph["groups"], list)
    nodes = {node["id"]: node for node in graph["nodes"]}
    assert len(nodes) == len(graph["nodes"]) and max(nodes) <= graph["last_node_id"]
    links = {link[0]: link for link in graph["links"]}
    assert len(links) == len(graph["links"]) and max(links) <= graph["last_link_id"]
    for node in nodes.values():
        assert len(node["pos"]) == 2 and len(node["size"]) == 2 and node["mode"] == 0
        if node["type"] in VIRTUAL_NODES:
            continue
        node_def = object_info[node["type"]]
        declared = declared_inputs(node_def)
        sockets = [(input_name, kind) for input_name, kind, _, widget in declared if not widget]
        widgets = {input_name: kind for input_name, kind, _, widget in declared if widget}
        plain = [(i["name"], i["type"]) for i in node["inputs"] if "widget" not in i]
        assert plain == sockets, f"{name}: node {node['id']} sockets"
        for converted in (i for i in node["inputs"] if "widget" in i):  # a widget fed by a link
            assert converted["widget"]["name"] == converted["name"], f"{name}: node {node['id']} {converted}"
            assert widgets.get(converted["name"]) == converted["type"], f"{name}: node {node['id']} {converted}"
        saved_outputs = [o["type"] for o in node["outputs"]]
        if node_def["python_module"].startswith("custom_nodes."):  # the pack's own nodes: as they are now
            assert saved_outputs == node_def["output"], f"{name}: node {node['id']} outputs"
        else:  # a core node may have gained outputs since (0.33's SaveImage an IMAGE); the frontend adds them, unlinked
            assert saved_outputs == node_def["output"][:len(saved_outputs)], f"{name}: node {node['id']} outputs"
        for slot, output in enumerate(node["outputs"]):
            for link_id in output["links"] or []:
                assert links[link_id][1:3] == [node["id"], slot] and links[link_id][5] == output["type"]
        for slot, socket in enumerate(node["inputs"]):
            if socket["link"] is None:  # an optional socket left open (APG's mask)
                continue
            _, _, _, target, target_slot, kind = links[socket["link"]]
            assert (target, target_slot, kind) == (node["id"], slot, socket["type"])
    for link_id, origin, slot, target, target_slot, kind in graph["links"]:
        assert link_id in nodes[origin]["outputs"][slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
    orders = sorted(node["order"] for node in nodes.values())
    assert orders == list(range(len(nodes)))
    for _, origin, _, target, _, _ in graph["links"]:
        assert nodes[origin]["order"] < nodes[target]["order"], f"{name}: order runs against link {origin}->{target}"


def test_ui_and_api_workflows_agree(workflow, object_info):
    """The shipped API workflow is exactly what the frontend queues for the shipped UI workflow."""
    name, graph = workflow
    assert to_api(graph, object_info) == load(API_DIR / f"{name}.json")


@pytest.mark.parametrize("name", sorted(APG_COMPARISONS))
def test_apg_comparison_settings(name):
    """CFG vs APG on the same model, prompts, latent and sampler settings, at the family's native resolution."""
    ckpt, size, cfg = APG_COMPARISONS[name]
    graph = load(WORKFLOWS / f"{name}.json")
    prompt = load(API_DIR / f"{name}.json")
    by_type = {}
    for node_id, node in prompt.items():
        by_type.setdefault(node["class_type"], {})[node_id] = node["inputs"]
    [loader] = by_type["CheckpointLoaderSimple"].values()
    assert loader["ckpt_name"] == ckpt
    [latent] = by_type["EmptyLatentImage"].values()
    assert (latent["width"], latent["height"]) == (size, size)
    [apg_id] = by_type[APG]
    samplers = by_type["KSampler"]
    assert len(samplers) == 2
    plain, guided = sorted(samplers.values(), key=lambda s: s["model"][0] == apg_id)
    assert guided["model"] == [apg_id, 0] and prompt[apg_id]["inputs"]["model"] == plain["model"]
    shared = {k: v for k, v in plain.items() if k != "model"}
    assert shared == {k: v for k, v in guided.items() if k != "model"}
    assert shared["cfg"] == cfg and 20 <= shared["steps"] <= 30 and shared["denoise"] == 1.0
    prefixes = sorted(n["filename_prefix"] for n in by_type["SaveImage"].values())
    assert prefixes == [f"{name}/apg", f"{name}/cfg"]
    # A seed that changes after each run would compare different noise from the second run on.
    assert {n["widgets_values"][1] for n in graph["nodes"] if n["type"] == "KSampler"} == {"fixed"}


@pytest.mark.parametrize("name", sorted(FRECAS_COMPARISONS))
def test_frecas_comparison_settings(name):
    """FreCaS at two final sizes from the model's training size, with the family's settings and the VAE carrying each
    stage to the next, against plain CFG directly at the larger size: same model, prompts, seed, cfg, sampler and
    total steps."""
    ckpt, size, settings, scales = FRECAS_COMPARISONS[name]
    graph = load(WORKFLOWS / f"{name}.json")
    prompt = load(API_DIR / f"{name}.json")
    loaders = [i for i, n in prompt.items() if n["class_type"] in ("CheckpointLoaderSimple",
                                                                     "GuidanceReferenceModelLoader")]
    assert len(loaders) == 1
    loader = loaders[0]
    if ckpt:
        assert prompt[loader]["inputs"]["ckpt_name"] == ckpt
    vae_slot = 2 if ckpt else 1
    frecas = sorted((n["inputs"] for n in prompt.values() if n["class_type"] == FRECAS), key=lambda n: n["scale_by"])
    assert [n["scale_by"] for n in frecas] == list(scales)
    [direct] = [n["inputs"] for n in prompt.values() if n["class_type"] == "KSampler"]
    for node in frecas:
        assert tuple(node[k] for k in FRECAS_SETTINGS) == settings
        assert node["vae"] == [loader, vae_slot] and "mask" not in node
        first = prompt[node["latent_image"][0]]["inputs"]
        assert (first["width"], first["height"]) == (size, size)
        assert node["seed"] == direct["seed"]
        assert {k: node[k] for k in ("model", "positive", "negative")} == {k: direct[k] for k in ("model", "positive",
                                                                                                  "negative")}
    latent = prompt[direct["latent_image"][0]]["inputs"]
    assert (latent["width"], latent["height"]) == (round(size * scales[-1]),) * 2
    assert direct["cfg"] == settings[3] and direct["sampler_name"] == settings[6] and direct["denoise"] == 1.0
    assert direct["steps"] == sum(int(n) for n in settings[0].split(","))
    areas = [f"{round(scale * scale)}x" for scale in scales]
    prefixes = sorted(n["inputs"]["filename_prefix"] for n in prompt.values() if n["class_type"] == "SaveImage")
    assert prefixes == sorted([f"{name}/cfg_direct"] + [f"{name}/frecas_{area}_area" for area in areas])
    # A seed that changes after each run would compare different noise from the second run on.
    assert {n["widgets_values"][1] for n in graph["nodes"] if n["type"] == "KSampler"} == {"fixed"}
    assert {n["widgets_values"][2] for n in graph["nodes"] if n["type"] == FRECAS} == {"fixed"}


# PPAP on the reference model: the unconditional model (the empty class at cfg 1) with no guidance, EluCD and PPAP on
# the same noise, and the training workflow, with the sampling of bench/ppap_bench.py and the guidance scale it
# recommends for the shipped experts (bench/results/ppap_bench.json; PPAP_SCALE until that exists).
PPAP_GUIDANCE, PPAP_TRAINING = "PPAP classifier guidance (reference model)", "Train PPAP experts (reference model)"
PPAP_SCALE = 8.0
PPAP_EXPERT_FILE = "fashion_ppap5.safetensors"
PPAP_SAMPLING = {"steps": 25, "cfg": 1.0, "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0}
PPAP_BENCH = WORKFLOWS.parent / "bench" / "results" / "ppap_bench.json"


def ppap_bench_settings():
    """(steps, sampler, scheduler, recommended scale) of the PPAP bench's reference-model run, or the workflow's
    provisional settings while the bench has not run."""
    if not PPAP_BENCH.exists():
        return PPAP_SAMPLING["steps"], PPAP_SAMPLING["sampler_name"], PPAP_SAMPLING["scheduler"], PPAP_SCALE
    run = json.loads(PPAP_BENCH.read_text())["reference"]
    return run["steps"], run["sampler"], run["scheduler"], run["recommended"]["scale"]


def test_ppap_workflows_sample_as_the_bench_measured():
    """Both PPAP workflows sample as the bench does and guide at the scale it recommends."""
    steps, sampler, scheduler, scale = ppap_bench_settings()
    assert (PPAP_SAMPLING["steps"], PPAP_SAMPLING["sampler_name"], PPAP_SAMPLING["scheduler"]) == (steps, sampler,
                                                                                                  scheduler)
    for name in (PPAP_GUIDANCE, PPAP_TRAINING):
        [ppap] = by_type(load(API_DIR / f"{name}.json"))["GuidancePPAP"].values()
        assert ppap["scale"] == scale, name


def by_type(prompt):
    found = {}
    for node_id, node in prompt.items():
        found.setdefault(node["class_type"], {})[node_id] = node["inputs"]
    return found


def check_unconditional_samplers(prompt, graph, guided_models):
    """The KSamplers: the empty class (the conditioning's negative output) as both prompts, PPAP_SAMPLING, one seed;
    their models: `guided_models` (node types, None for the loader's model); the seeds fixed in the UI."""
    nodes = by_type(prompt)
    [conditioning] = nodes["GuidanceReferenceClassConditioning"]
    [loader] = nodes["GuidanceReferenceModelLoader"]
    samplers = list(nodes["KSampler"].values())
    assert sorted((prompt[s["model"][0]]["class_type"] if s["model"] != [loader, 0] else "") for s in samplers) == \
        sorted(t or "" for t in guided_models)
    for sampler in samplers:
        assert sampler["positive"] == sampler["negative"] == [conditioning, 1]
        assert {k: sampler[k] for k in PPAP_SAMPLING} == PPAP_SAMPLING
    assert len({s["seed"] for s in samplers}) == 1
    assert prompt[conditioning]["inputs"]["class_name"] == "all classes"
    assert {n["widgets_values"][1] for n in graph["nodes"] if n["type"] == "KSampler"} == {"fixed"}


def test_ppap_guidance_workflow_settings():
    """No guidance, EluCD and PPAP side by side on the unconditional model: the shipped experts on the classifier that
    picks the targets (all classes, one image each), one Save Image per method."""
    name = PPAP_GUIDANCE
    prompt, graph = load(API_DIR / f"{name}.json"), load(WORKFLOWS / f"{name}.json")
    check_unconditional_samplers(prompt, graph, [None, "GuidanceEluCD", "GuidancePPAP"])
    nodes = by_type(prompt)
    [(targets_id, targets)] = nodes["GuidanceClassifierTargets"].items()
    assert (targets["classes"], targets["images_per_class"]) == ("all classes", 1)
    [ppap] = nodes["GuidancePPAP"].values()
    [elucd] = nodes["GuidanceEluCD"].values()
    assert ppap["targets"] == elucd["targets"] == [targets_id, 0] and "mask" not in ppap
    experts = prompt[ppap["experts"][0]]
    assert experts["class_type"] == "GuidancePPAPLoadExperts" and experts["inputs"]["experts"] == PPAP_EXPERT_FILE
    assert experts["inputs"]["classifier"] == targets["classifier"]
    assert prompt[targets["classifier"][0]]["inputs"]["weights"] == "fashion_classifier.safetensors"
    prefixes = sorted(n["filename_prefix"] for n in nodes["SaveImage"].values())
    assert prefixes == [f"{name}/elucd", f"{name}/ppap", f"{name}/unguided"]


def test_ppap_training_workflow_settings():
    """Train PPAP Experts on the unconditional model's samples (the empty class at cfg 1) from the classifier that
    picks the targets, at settings a CPU runs in minutes, into a file of its own (not the shipped one, which it would
    hide in Load PPAP Experts' list); its experts guide the KSampler's model."""
    name = PPAP_TRAINING
    prompt, graph = load(API_DIR / f"{name}.json"), load(WORKFLOWS / f"{name}.json")
    check_unconditional_samplers(prompt, graph, ["GuidancePPAP"])
    nodes = by_type(prompt)
    [(train_id, train)] = nodes["GuidancePPAPTrainExperts"].items()
    [conditioning] = nodes["GuidanceReferenceClassConditioning"]
    [loader] = nodes["GuidanceReferenceModelLoader"]
    [targets] = nodes["GuidanceClassifierTargets"].values()
    [ppap] = nodes["GuidancePPAP"].values()
    assert train["positive"] == train["negative"] == [conditioning, 1] and train["transfer_cfg"] == 1.0
    assert train["model"] == [loader, 0] and train["vae"] == [loader, 1] and train["classifier"] == targets["classifier"]
    assert ppap["experts"] == [train_id, 0] and ppap["model"] == [loader, 0]
    assert train["experts"] <= train["train_steps"] <= 1000 and train["transfer_images"] <= 1024
    assert f"{train['filename']}.safetensors" != PPAP_EXPERT_FILE
    assert [n["filename_prefix"] for n in nodes["SaveImage"].values()] == [f"{name}/ppap"]
