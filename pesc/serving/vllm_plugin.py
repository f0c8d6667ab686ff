"""The `vllm.general_plugins` entry point (`pip install 'pesc-moe[vllm]'`): makes vLLM serve PESC checkpoints with
its native model (pesc.serving.vllm_model), registered by name so that nothing heavy loads until a PESC model
does; vLLM calls it in every process it starts."""


def register() -> None:
    from vllm import ModelRegistry

    if "PescForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("PescForCausalLM", "pesc.serving.vllm_model:PescForCausalLM")
