"""Sibling sites: a method's module beside a decoder layer's linear (or activation) it acts on (LoRA experts,
scaled vectors), connected by a hook that follows the linear when bitsandbytes or peft replace it; and what
serving engines may not do to those linears (merge them away, split them across tensor-parallel ranks).

Shipped in every checkpoint: imports only torch.
"""

import sys

from torch import nn

from .moe_config import LINEAR_PARENTS


class _SiblingConnection:
    """Connects `parent.<sibling>` to whatever module `parent.<linear>` is at the parent's next forward.

    bitsandbytes swaps the linear for a Linear4bit at load time and peft wraps it in a LoRA layer:
    the parent's forward pre-hook notices the new object, moves the hook to it (removing the old
    one, so the sibling never acts twice), and the base tensor names stay where they were.
    """

    def __init__(self, linear: str, sibling: str, position: str, keep_whole: tuple[str, ...] = ()):
        self.linear, self.sibling, self.position = linear, sibling, position
        self.keep_whole = keep_whole  # further linears of the parent that serving engines must not merge
        self._hooked = None
        self._handle = None

    def reconnect(self, parent: nn.Module, args) -> None:
        linear = parent._modules[self.linear]
        if linear is self._hooked:
            return
        if self._handle is not None:
            self._handle.remove()
        sibling = parent._modules[self.sibling]
        if self.position == "output":
            self._handle = linear.register_forward_hook(sibling.linear_output_hook)
        else:
            self._handle = linear.register_forward_pre_hook(sibling.linear_input_hook)
        self._hooked = linear


def linear_on(layer: nn.Module, parent_name: str, linear_name: str, base_model_type: str, label: str) -> nn.Linear:
    """`layer.<parent>.<linear>` of a decoder layer, or a one-line error saying the family has no such linear."""
    linear = getattr(getattr(layer, parent_name, None), linear_name, None)
    if not isinstance(linear, nn.Linear):
        raise ValueError(
            f"{label} cannot wrap model family {base_model_type!r}: its decoder layers have no linear "
            f"{parent_name}.{linear_name}"
        )
    return linear


def activation_on(layer: nn.Module, parent_name: str, name: str, base_model_type: str, label: str,
                  layers) -> nn.Module:
    """`layer.<parent>.<name>`, an activation module of this decoder layer alone (a site hooks its output), or a
    one-line error saying the family has none, or shares one between its `layers` (each layer's site would act in
    every layer)."""
    module = getattr(getattr(layer, parent_name, None), name, None)
    if not isinstance(module, nn.Module) or isinstance(module, nn.Linear):
        raise ValueError(
            f"{label} cannot wrap model family {base_model_type!r}: its decoder layers have no activation module "
            f"{parent_name}.{name}"
        )
    if any(getattr(getattr(other, parent_name), name) is module for other in layers if other is not layer):
        raise ValueError(
            f"{label} cannot wrap model family {base_model_type!r}: its decoder layers share one {parent_name}.{name} "
            "module, which a site cannot hook per layer"
        )
    return module


def attach_sibling(parent: nn.Module, linear: str, sibling_name: str, sibling: nn.Module, position: str,
                   keep_whole: tuple[str, ...] = ()) -> None:
    """Add `sibling` as `parent.<sibling_name>` and let it act on `parent.<linear>` at `position`.

    position "output": the module's output becomes `sibling.linear_output_hook(module, (x,), output)`
    (e.g. LoRA experts: output + experts(x); MoV: output * vector; the module may be an activation, as
    MoV's act_fn); "input": the linear's input becomes what `sibling.linear_input_hook(linear, (x,))`
    returns (e.g. MoV on down_proj's input). `keep_whole`: further linears of the parent that serving
    engines must not merge for the site to see its tensor (`site_linears` names them with the hooked one).
    """
    if position not in ("output", "input"):
        raise ValueError(f"a sibling site acts on a linear's 'output' or 'input', not {position!r}")
    if not isinstance(parent._modules.get(linear), nn.Module):
        raise ValueError(f"{type(parent).__name__} has no module {linear!r} to attach {sibling_name!r} to")
    parent.add_module(sibling_name, sibling)
    connection = _SiblingConnection(linear, sibling_name, position, keep_whole)
    connection.reconnect(parent, ())  # now: a compiled first forward (vLLM's) cannot register hooks
    parent.register_forward_pre_hook(connection.reconnect)


class UnmergedLinear(nn.Module):
    """nn.Linear's computation under a class that is not nn.Linear (what `MoEModel` makes of a linear a site acts on).

    Serving engines merge sibling linears they recognise by type (vLLM's Transformers backend turns q/k/v
    and gate/up into one linear and deletes the three), which would leave a site's hook on nothing.
    """

    forward = nn.Linear.forward
    extra_repr = nn.Linear.extra_repr


def site_linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, name) of every module a sibling site acts on (a linear, or an activation) and of the linears it
    keeps whole (MoV's act_fn site: gate_proj, which vLLM would otherwise fuse with up_proj into one
    act-and-mul, replacing the hooked activation by act(gate(x)) * up(x))."""
    found = []
    for parent in model.modules():
        for hook in parent._forward_pre_hooks.values():
            connection = getattr(hook, "__self__", None)
            if isinstance(connection, _SiblingConnection):
                found.extend((parent, name) for name in (connection.linear, *connection.keep_whole))
    return found


def refuse_sharded_attention_sites(config, hooked_linears: list[str]) -> None:
    """A clear error where vLLM would split attention over tensor-parallel ranks while sites hook attention linears.

    vLLM splits the attention heads across tensor-parallel ranks, but a linear a site acts on stays whole
    (`UnmergedLinear`), so attention would mix whole and sharded projections: at 2 ranks MoELoRA's q/v sites
    gave wrong tokens without an error and MoV's k/v sites a shape error. Sites on the FFN only, and pipeline
    parallelism (whole layers per rank), run fine.
    """
    attention = sorted({name for name in hooked_linears if LINEAR_PARENTS.get(name) == "self_attn"})
    ranks = vllm_tensor_parallel_ranks() if config._attn_implementation == "vllm" else 1
    if attention and ranks > 1:
        raise ValueError(
            f"this model's sites act on attention linears ({', '.join(attention)}), which vLLM cannot split across "
            f"{ranks} tensor-parallel ranks: serve it with tensor_parallel_size=1 (pipeline parallelism works)"
        )


def vllm_tensor_parallel_ranks() -> int:
    """vLLM's tensor-parallel size while vLLM builds this model (read from its already loaded module: the shipped
    code imports nothing of vLLM), else 1."""
    state = sys.modules.get("vllm.distributed.parallel_state")
    if state is None or not state.model_parallel_is_initialized():
        return 1
    return state.get_tensor_model_parallel_world_size()
