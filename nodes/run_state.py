"""State that lives for exactly one sampling run.

ComfyUI clones `model_options` at the start of every sampling run (`CFGGuider.inner_sample`) and hands that clone to
the sampler hooks through `args["model_options"]`. State kept in the clone's `transformer_options` is therefore fresh
for each run and shared by nothing else: two queued prompts, or two models patched by the same node, never see each
other's state, which closure variables on a patched model would give them.
"""

RUN_STATE_KEY = "comfyui_guidance.run_state"


def reserve_run_state(model) -> None:
    """Give a patched model (a ModelPatcher) the empty store that each run's clone of its options copies.

    ComfyUI hands `transformer_options` to the diffusion model in every call. A store that first appeared after the
    run's first call would change that dict between calls, and a model compiled with torch.compile guards on it:
    it would compile the model a second time. Reserved when the model is patched, the store is there from the first
    call of every run.
    """
    model.model_options.setdefault("transformer_options", {}).setdefault(RUN_STATE_KEY, {})


def run_state(model_options: dict, owner: object, factory):
    """The state of `owner` (a hook object) for the current run, made by `factory()` on first use."""
    store = model_options.setdefault("transformer_options", {}).setdefault(RUN_STATE_KEY, {})
    key = id(owner)
    if key not in store:
        store[key] = factory()
    return store[key]
