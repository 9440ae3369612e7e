"""scripts/fit_linear_ag.py, the command that fits LinearAG coefficients, run as a user runs it: a fresh Python
process on a checkpoint file (the tests' slim SD1.5 checkpoint with its full-size text encoder), writing a file that
the LinearAG node accepts for that model and refuses for another."""

import os
import subprocess
import sys

from comfy.sd import load_checkpoint_guess_config

import slim_models
from conftest import REPO, comfyui_dir


def test_command_writes_coefficients_for_the_checkpoint(comfy, pack, tmp_path):
    from comfyui_guidance.nodes.adaptive_patch import (LINEAR_DISPLAY_NAME, LinearAGCoefficients, check_model,
                                                       model_fingerprint)

    checkpoint = slim_models.cached_checkpoint("v1-5-pruned-emaonly.safetensors")
    out = tmp_path / "sd15_euler_karras_6.safetensors"
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fit_linear_ag.py"), "--comfyui", str(comfyui_dir()), "--cpu",
         "--checkpoint", str(checkpoint), "--positive", "a fox in the snow", "--negative", "blurry",
         "--width", "64", "--height", "64", "--sampler", "euler", "--scheduler", "karras", "--steps", "6",
         "--cfg", "5", "--images", "4", "--batch", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fit_linear_ag: 2/4 images" in run.stdout and "fit_linear_ag: 4/4 images" in run.stdout
    assert f"wrote {out}" in run.stdout
    fitted = LinearAGCoefficients.load(out)
    assert (fitted.info["sampler"], fitted.info["scheduler"], fitted.info["steps"], fitted.info["cfg"],
            fitted.info["images"]) == ("euler", "karras", 6, 5.0, 4)
    assert fitted.info["estimated_calls"] == [1] and len(fitted.schedule) == 7
    model = load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)[0]
    assert fitted.info["model_fingerprint"] == model_fingerprint(model)
    check_model(fitted, model, LINEAR_DISPLAY_NAME)


def test_command_says_what_is_wrong(comfy, tmp_path):
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fit_linear_ag.py"), "--comfyui", str(comfyui_dir()), "--cpu",
         "--reference", "--cfg", "1", "--out", str(tmp_path / "x.safetensors")],
        capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "cfg is 1" in run.stderr
    assert not (tmp_path / "x.safetensors").exists()
