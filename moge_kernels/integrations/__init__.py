"""Bridges from other stacks to the `torch.ops.moge` kernels. Each submodule imports its stack itself, so
`import moge_kernels` never imports transformers or vLLM:

    moge_kernels.integrations.transformers   experts implementation "moge" for every
                                             `@use_experts_implementation` experts module (needs transformers)
    moge_kernels.integrations.pangu          swap Pangu Pro MoE's MoGE blocks for `moge_kernels.MoGELayer`
    moge_kernels.integrations.vllm           MoGE routing as a vLLM `custom_routing_function`
"""
