"""scripts/train_agd.py, the command that trains AGD adapters, run as a user runs it: a fresh Python process on a
checkpoint file (the tests' slim SD1.5 checkpoint with its full-size text encoder), writing adapters that Apply AGD
accepts for that model and refuses for another."""

import os
import subprocess
import sys

import pytest
import torch
from comfy.sd import load_checkpoint_guess_config

import slim_models
from conftest import REPO, comfyui_dir


def test_command_writes_adapters_for_the_checkpoint(comfy, pack, tmp_path):
    from comfyui_guidance.nodes.agd_patch import check_base, read_adapter_file

    checkpoint = slim_models.cached_checkpoint("v1-5-pruned-emaonly.safetensors")
    out = tmp_path / "sd15_agd.safetensors"
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_agd.py"), "--comfyui", str(comfyui_dir()), "--cpu",
         "--checkpoint", str(checkpoint), "--positive", "a fox in the snow", "--negative", "blurry",
         "--width", "64", "--height", "64", "--trajectories", "2", "--trajectory-batch", "2", "--sample-steps", "2",
         "--train-steps", "100", "--batch", "2", "--hidden", "8", "--scale-high", "5", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "train_agd: 100/102" in run.stdout and "train_agd: 102/102" in run.stdout
    assert f"wrote {out}" in run.stdout and not out.with_suffix(".training").exists()
    adapters = read_adapter_file(str(out))
    assert (adapters.spec.hidden_dim, adapters.info["scale_low"], adapters.info["scale_high"]) == (8, "1.0", "5.0")
    model = load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)[0]
    check_base(adapters, model, "exact weights")
    key = next(k for k in model.model_state_dict() if k.endswith("attn2.to_k.weight"))
    with_lora = model.clone()
    with_lora.add_patches({key: (torch.zeros_like(model.model_state_dict()[key]),)}, 0.5)
    with pytest.raises(ValueError, match="trained on other weights"):
        check_base(adapters, with_lora, "exact weights")
    check_base(adapters, with_lora, "same architecture")
    with pytest.raises(ValueError, match="another architecture"):
        check_base(adapters, slim_models.build_model("sdxl"), "same architecture")


def test_command_says_what_is_wrong(comfy, tmp_path):
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_agd.py"), "--comfyui", str(comfyui_dir()), "--cpu",
         "--reference", "--scale-low", "7", "--scale-high", "3", "--out", str(tmp_path / "x.safetensors")],
        capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "scale range" in run.stderr
    assert not (tmp_path / "x.safetensors").exists()
