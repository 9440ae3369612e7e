"""The nodes' help pages (`web/docs/<node id>/en.md`, which the frontend's Node Info tab shows) against the nodes ComfyUI
registered from the pack: one page per node and no other, each with the node's display name, the headings every page
has, and exactly the node's inputs and outputs (the tables scripts/help_pages.py renders from the schema); the
pictures they show and the repository files they link exist; the README's node table links every page.
(tests/test_help_pages_browser.py checks that the server serves them and the frontend shows them.)"""

import pathlib
import re
import tomllib

import pytest
from comfy_server import PACK
from help_pages import HELP_PAGES, REQUIRED_HEADINGS, generated_section, page_path, page_section
from render_thumbnails import REFERENCE_MODEL, WORKFLOWS, docs_image, model_of

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGES = REPO / HELP_PAGES
REPOSITORY = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def pack_nodes(comfy):
    """The node classes ComfyUI registered from this pack, by node id."""
    return {node_id: cls for node_id, cls in comfy.NODE_CLASS_MAPPINGS.items()
            if getattr(cls, "RELATIVE_PYTHON_MODULE", None) == f"custom_nodes.{PACK}"}


def node_ids():
    return sorted(page.parent.name for page in PAGES.glob("*/en.md"))


def test_every_registered_node_has_a_page_and_every_page_a_node(comfy):
    nodes = set(pack_nodes(comfy))
    assert nodes, "no node of the pack registered"
    pages = set(node_ids())
    assert not nodes - pages, f"nodes without a help page in {HELP_PAGES}/: {sorted(nodes - pages)}"
    assert not pages - nodes, f"help pages of no registered node: {sorted(pages - nodes)}"


@pytest.mark.parametrize("node_id", node_ids())
def test_page_lists_exactly_the_nodes_inputs_and_outputs(comfy, node_id):
    cls = pack_nodes(comfy)[node_id]
    expected = generated_section(cls.INPUT_TYPES(), cls.RETURN_TYPES, cls.RETURN_NAMES)
    page = (REPO / page_path(node_id)).read_text()
    assert page_section(page) == expected, f"replace the generated block of {page_path(node_id)} with:\n{expected}"


@pytest.mark.parametrize("node_id", node_ids())
def test_page_has_the_title_and_headings(comfy, node_id):
    page = (REPO / page_path(node_id)).read_text()
    assert page.startswith(f"# {comfy.NODE_DISPLAY_NAME_MAPPINGS[node_id]}\n"), "the title is the node's display name"
    headings = [line for line in page.splitlines() if line.startswith("## ")]
    positions = [headings.index(h) if h in headings else -1 for h in REQUIRED_HEADINGS]
    assert -1 not in positions and positions == sorted(positions), \
        f"{page_path(node_id)} needs the headings {REQUIRED_HEADINGS} in that order; it has {headings}"
    intro = page.split("\n\n## ")[0].split("\n\n", 1)[1]
    assert len(re.findall(r"[.!?](\s|$)", intro)) == 2, "the text under the title says what the node does in two sentences"


@pytest.mark.parametrize("node_id", node_ids())
def test_page_links_resolve(node_id):
    """Pictures are files under web/docs/ (the frontend resolves relative links against docs/); links to the
    repository name files that exist in it."""
    page = (REPO / page_path(node_id)).read_text()
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page):
        assert not re.match(r"(/|[a-z]+:)", target), f"picture {target}: a relative link, served with the page"
        assert (PAGES / target).is_file(), f"picture {target} is not in {HELP_PAGES}/"
    for path in re.findall(re.escape(REPOSITORY) + r"/blob/main/([^)\s]+)", page):
        assert (REPO / path).is_file(), f"{page_path(node_id)} links {path}, which is not in the repository"
    for url in re.findall(r"https?://github\.com/[^)\s]*", page):
        assert url.startswith(REPOSITORY + "/"), f"{url}: links to this repository use pyproject.toml's Repository"


def test_help_page_pictures_are_the_reference_workflows_thumbnails():
    """A page's picture is its reference-model workflow's thumbnail, a real output (scripts/render_thumbnails.py
    writes both)."""
    pictures = {path.name for path in (PAGES / "images").glob("*.jpg")}
    reference = [path.stem for path in WORKFLOWS.glob("*.json") if model_of(path.stem) == REFERENCE_MODEL]
    assert pictures == {docs_image(name).name for name in reference}
    for name in reference:
        assert docs_image(name).read_bytes() == (WORKFLOWS / f"{name}.jpg").read_bytes(), name


def test_readme_links_every_help_page():
    readme = (REPO / "README.md").read_text()
    linked = set(re.findall(re.escape(HELP_PAGES) + r"/(\w+)/en\.md", readme))
    assert linked == set(node_ids()), f"README's node table: missing {sorted(set(node_ids()) - linked)}, " \
                                      f"extra {sorted(linked - set(node_ids()))}"
