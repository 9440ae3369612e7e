"""Renders the template browser's thumbnails: `workflows/<name>.jpg` beside each UI workflow. One command, in the host
that scripts/setup_host.sh builds:

    bash scripts/render_thumbnails.sh                    # every workflow
    bash scripts/render_thumbnails.sh "<workflow name>"  # only these (file names without .json)

A reference-model workflow's API-format twin (`workflows/api/<name>.json`) is queued on a real ComfyUI server with
this pack, as shipped (trained weights: real images); its thumbnail has one row per Save Image node, in node order, and
is also the picture of the nodes' help pages (`web/docs/images/<slug>.jpg`). The weights of the other workflows'
models (SD1.5, SDXL, SD3) are not here, and an output of random weights would show noise, so their thumbnail is a
card: the workflow's method and model, and the same method's comparison on the reference model, labelled as such.
"""

import argparse
import io
import json
import pathlib
import re
import shutil
import sys
import tempfile

from PIL import Image, ImageDraw, ImageFont

from comfy_server import ComfyServer, link_pack

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
DOCS_IMAGES = REPO / "web" / "docs" / "images"
REFERENCE_MODEL = "reference model"
THUMBNAIL_SIZE = 256
MAX_COLUMNS = 5
BACKGROUND = (24, 24, 24)
TEXT, ACCENT, MUTED = (240, 240, 240), (110, 170, 255), (170, 170, 170)
CARD_MARGIN = 14
# The longest a workflow may run: on a 2-core CPU the reference model's FreCaS workflow as shipped (30 steps of CFG at
# 128x128 beside the FreCaS runs) takes over half an hour.
RUN_TIMEOUT_S = 3 * 3600


def model_of(name: str) -> str:
    """The model a workflow runs, from its file name: `<method> vs CFG (<model>)` or `<method> <task> (<model>)`."""
    return name[name.rindex("(") + 1:-1]


def docs_image(name: str) -> pathlib.Path:
    """Where a reference-model workflow's picture lives for the help pages (a name that needs no escaping in a link)."""
    return DOCS_IMAGES / (re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + ".jpg")


def reference_counterpart(name: str, names: list[str]) -> str | None:
    """The reference-model comparison with CFG of the method that starts this workflow's name, if there is one."""
    method = name.split()[0]
    return next((other for other in sorted(names) if model_of(other) == REFERENCE_MODEL
                 and other.split()[0] == method and " vs CFG " in other), None)


def _wrapped(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not lines[-1]:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def card(name: str, reference: str | None) -> Image.Image:
    """A designed thumbnail for a workflow whose model has no weights here: the method and model as text, and the
    reference model's thumbnail of the same method, captioned as such (or a line saying there is none)."""
    square = Image.new("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(square)
    title, model = name[:name.rindex("(")].strip(), model_of(name)
    font = ImageFont.load_default(size=20)
    y = CARD_MARGIN
    for line in _wrapped(draw, title, font, THUMBNAIL_SIZE - 2 * CARD_MARGIN):
        draw.text((CARD_MARGIN, y), line, font=font, fill=TEXT)
        y += 24
    draw.text((CARD_MARGIN, y + 2), model, font=ImageFont.load_default(size=28), fill=ACCENT)
    y += 40
    small = ImageFont.load_default(size=12)
    caption = ("The same method on the reference model:" if reference else
               f"No reference-model workflow for this method; run it with your {model} checkpoint.")
    for line in _wrapped(draw, caption, small, THUMBNAIL_SIZE - 2 * CARD_MARGIN):
        draw.text((CARD_MARGIN, y), line, font=small, fill=MUTED)
        y += 15
    if reference:
        inset = Image.open(WORKFLOWS / f"{reference}.jpg").convert("RGB")
        # The thumbnail without its dark border (a threshold above JPEG's ringing), as large as the space left allows.
        inset = inset.crop(inset.convert("L").point(lambda v: 255 if v > 2 * max(BACKGROUND) else 0).getbbox())
        box = (THUMBNAIL_SIZE - 2 * CARD_MARGIN, THUMBNAIL_SIZE - CARD_MARGIN - y - 4)
        scale = min(box[0] / inset.width, box[1] / inset.height)
        inset = inset.resize((round(inset.width * scale), round(inset.height * scale)), Image.LANCZOS)
        square.paste(inset, ((THUMBNAIL_SIZE - inset.width) // 2, y + 4))
    return square


def thumbnail(rows: list[list[Image.Image]]) -> Image.Image:
    """The rows' first MAX_COLUMNS images tiled, scaled to fill the square's width or height and centred on it
    (pixel-sharp: scaled up by a whole factor, then down). Images of different sizes (FreCaS's stages) keep their
    relative size, each centred in a cell of the largest size."""
    rows = [row[:MAX_COLUMNS] for row in rows]
    w = max(image.width for row in rows for image in row)
    h = max(image.height for row in rows for image in row)
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (w * columns, h * len(rows)), BACKGROUND)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image, (c * w + (w - image.width) // 2, r * h + (h - image.height) // 2))
    zoom = -(-THUMBNAIL_SIZE // max(sheet.size))
    sheet = sheet.resize((sheet.width * zoom, sheet.height * zoom), Image.NEAREST)
    sheet.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.LANCZOS)
    square = Image.new("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE), BACKGROUND)
    square.paste(sheet, ((THUMBNAIL_SIZE - sheet.width) // 2, (THUMBNAIL_SIZE - sheet.height) // 2))
    return square


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", required=True, help="ComfyUI folder (scripts/setup_host.sh prints it)")
    parser.add_argument("names", nargs="*", help="workflows to render, by file name without .json (default: all)")
    args = parser.parse_args()
    apis = sorted((WORKFLOWS / "api").glob("*.json"))
    unknown = set(args.names) - {api.stem for api in apis}
    if unknown:
        parser.error(f"no such workflow: {', '.join(sorted(unknown))}")
    apis = [api for api in apis if not args.names or api.stem in args.names]
    names = [api.stem for api in sorted((WORKFLOWS / "api").glob("*.json"))]
    rendered = [api for api in apis if model_of(api.stem) == REFERENCE_MODEL]
    if rendered:
        render(rendered, pathlib.Path(args.comfyui))
    for api in apis:
        if model_of(api.stem) != REFERENCE_MODEL:
            target = WORKFLOWS / f"{api.stem}.jpg"
            card(api.stem, reference_counterpart(api.stem, names)).save(target, quality=85, optimize=True)
            print(f"wrote {target.relative_to(REPO)}")


def render(apis: list[pathlib.Path], comfyui: pathlib.Path):
    """Queue each workflow on a ComfyUI server; its Save Image outputs make its thumbnail and help-page picture."""
    with tempfile.TemporaryDirectory(prefix="guidance-thumbnails-") as base:
        base = pathlib.Path(base)
        link_pack(base / "custom_nodes")
        server = ComfyServer(base, comfyui)
        try:
            server.start()
            for api in apis:
                prompt = json.loads(api.read_text())
                entry = server.run_prompt(prompt, timeout_s=RUN_TIMEOUT_S)
                if entry["status"].get("status_str") != "success":
                    sys.exit(f"{api.name} failed: {json.dumps(entry['status'])[:2000]}")
                saved = sorted((int(node), output) for node, output in entry["outputs"].items()
                               if prompt[node]["class_type"] == "SaveImage")  # not Preview Image (a saliency map)
                rows = [[Image.open(io.BytesIO(server.view(image))).convert("RGB") for image in output["images"]]
                        for _, output in saved]
                target = WORKFLOWS / f"{api.stem}.jpg"
                thumbnail(rows).save(target, quality=85, optimize=True)
                shutil.copyfile(target, docs_image(api.stem))
                print(f"wrote {target.relative_to(REPO)} and {docs_image(api.stem).relative_to(REPO)}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
