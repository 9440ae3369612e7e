"""The main job: a headless ComfyUI run of the APG workflow on the embedded reference model.

Starts the real ComfyUI server with this pack in its custom_nodes, posts
`workflows/api/APG vs CFG (reference model).json` (every class of the reference model, CFG and APG from the same
seed) through the HTTP API, and writes a comparison image: one row per method, one column per class. Run it
through scripts/demo.sh, which builds the host first.
"""

import argparse
import io
import json
import pathlib
import sys
import tempfile

from PIL import Image, ImageDraw

from comfy_server import ComfyServer, link_pack

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKFLOW = REPO / "workflows" / "api" / "APG vs CFG (reference model).json"
ROWS = {"APG vs CFG (reference model)/cfg": "CFG", "APG vs CFG (reference model)/apg": "APG"}
ZOOM = 4
LABEL_WIDTH = 48


def comparison(rows: dict[str, list[Image.Image]], scale: float) -> Image.Image:
    first = next(iter(rows.values()))
    w, h = first[0].width * ZOOM, first[0].height * ZOOM
    sheet = Image.new("RGB", (LABEL_WIDTH + w * len(first), h * len(rows) + 16), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), f"reference model, guidance scale {scale:g}, same seed per column", fill="black")
    for r, (label, images) in enumerate(rows.items()):
        draw.text((4, 16 + r * h + h // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            sheet.paste(image.resize((w, h), Image.NEAREST), (LABEL_WIDTH + c * w, 16 + r * h))
    return sheet


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", required=True, help="ComfyUI folder (scripts/setup_host.sh prints it)")
    parser.add_argument("--out", default=str(REPO / "out" / "apg_demo.png"))
    args = parser.parse_args()
    prompt = json.loads(WORKFLOW.read_text())
    scale = next(n["inputs"]["cfg"] for n in prompt.values() if n["class_type"] == "KSampler")
    with tempfile.TemporaryDirectory(prefix="guidance-demo-") as base:
        base = pathlib.Path(base)
        link_pack(base / "custom_nodes")
        server = ComfyServer(base, pathlib.Path(args.comfyui))
        try:
            server.start()
            entry = server.run_prompt(prompt, timeout_s=1800)
            if entry["status"].get("status_str") != "success":
                sys.exit(f"the workflow failed: {json.dumps(entry['status'])[:2000]}")
            rows = {label: [] for label in ROWS.values()}
            for node_id, output in sorted(entry["outputs"].items(), key=lambda item: int(item[0])):
                prefix = prompt[node_id]["inputs"]["filename_prefix"]
                for image in output["images"]:
                    rows[ROWS[prefix]].append(Image.open(io.BytesIO(server.view(image))).convert("RGB"))
        finally:
            server.stop()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    comparison(rows, scale).save(out)
    print(f"wrote {out}: {', '.join(f'{k} x{len(v)}' for k, v in rows.items())}")


if __name__ == "__main__":
    main()
