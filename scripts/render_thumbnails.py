"""Renders the template browser's thumbnails: `workflows/<name>.jpg` beside each UI workflow, from that workflow's
own output. One command, in the host that scripts/setup_host.sh builds:

    bash scripts/render_thumbnails.sh                    # every workflow
    bash scripts/render_thumbnails.sh "<workflow name>"  # only these (file names without .json)

Each API-format twin (`workflows/api/<name>.json`) is queued on a real ComfyUI server with this pack. The reference
model's workflow runs as shipped (32x32, trained weights: real images); the SD workflows run on the tests' slim
random-weight checkpoints at the tests' CPU size and step count (tests/test_e2e_server.py `shrunk`), so their images
are noise-like but still what the graph makes. The thumbnail has one row per Save Image node, in node order.
"""

import argparse
import io
import json
import pathlib
import sys
import tempfile

from PIL import Image

from comfy_server import COMFY_ARGS, ComfyServer, link_pack

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
THUMBNAIL_SIZE = 256
MAX_COLUMNS = 5
BACKGROUND = (24, 24, 24)
# The longest a workflow may run: on a 2-core CPU the reference model's FreCaS workflow as shipped (30 steps of CFG at
# 128x128 beside the FreCaS runs) takes over half an hour.
RUN_TIMEOUT_S = 3 * 3600


def write_fixture_checkpoints(comfyui: pathlib.Path, models: pathlib.Path):
    """The tests' slim checkpoints (tests/slim_models.py, which needs ComfyUI imported as main.py does)."""
    sys.path[:0] = [str(comfyui), str(REPO / "tests")]
    sys.argv = ["main.py", *COMFY_ARGS]
    import comfy.options

    comfy.options.enable_args_parsing()
    import utils.extra_config  # noqa: F401  (before `nodes`, as in tests/conftest.py)
    import slim_models

    slim_models.write_checkpoints(models)


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
    comfyui = pathlib.Path(args.comfyui)
    with tempfile.TemporaryDirectory(prefix="guidance-thumbnails-") as base:
        base = pathlib.Path(base)
        link_pack(base / "custom_nodes")
        write_fixture_checkpoints(comfyui, base / "models")
        from test_e2e_server import shrunk

        server = ComfyServer(base, comfyui)
        try:
            server.start()
            for api in apis:
                prompt = json.loads(api.read_text())
                if any(n["class_type"] == "CheckpointLoaderSimple" for n in prompt.values()):
                    prompt = shrunk(prompt)
                entry = server.run_prompt(prompt, timeout_s=RUN_TIMEOUT_S)
                if entry["status"].get("status_str") != "success":
                    sys.exit(f"{api.name} failed: {json.dumps(entry['status'])[:2000]}")
                saved = sorted((int(node), output) for node, output in entry["outputs"].items()
                               if prompt[node]["class_type"] == "SaveImage")  # not Preview Image (a saliency map)
                rows = [[Image.open(io.BytesIO(server.view(image))).convert("RGB") for image in output["images"]]
                        for _, output in saved]
                target = WORKFLOWS / f"{api.stem}.jpg"
                thumbnail(rows).save(target, quality=85, optimize=True)
                print(f"wrote {target.relative_to(REPO)}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
