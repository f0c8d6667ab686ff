"""The `vllm.general_plugins` entry point (`pip install 'pesc-moe[vllm]'`): makes vLLM serve the checkpoints of every
method that has a native vLLM model (`Method.vllm_model`) with it, registered by name so that nothing heavy loads
until such a model does; vLLM calls it in every process it starts."""


def register() -> None:
    from vllm import ModelRegistry

    from pesc.methods import METHODS

    supported = ModelRegistry.get_supported_archs()
    for method in METHODS.values():
        if method.vllm_model is not None:
            architecture = method.model_class_path.rsplit(".", 1)[-1]
            if architecture not in supported:
                ModelRegistry.register_model(architecture, method.vllm_model)
