"""transformers 4.5x ``Dots1MoE`` + ``Dots1TopkRouter`` + ``Dots1MLP`` (dots.llm1; github
huggingface/transformers, ``src/transformers/models/dots1/modeling_dots1.py``), read from the released
wheel v4.55.0 (PyPI ``transformers==4.55.0``). Diffed against ``DeepseekV3MoE`` /
``DeepseekV3TopkRouter`` / ``DeepseekV3MLP`` of the same release with the class names replaced: the
same op for op, so this entry builds the classes of ``deepseek_v3_45x.py`` with ``Dots1Config``'s
defaults for the routing: one group (``n_group = topk_group = 1``), ``norm_topk_prob`` False (the
gathered sigmoid scores are used as they are), ``routed_scaling_factor`` 1.0; two shared experts'
width.
"""
from __future__ import annotations

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens

from .deepseek_v3_45x import DeepseekV3MoE


class Dots1ConfigLite:
    """The ``Dots1Config`` fields the MoE classes read (deviation: a plain object, not the config class;
    tiny sizes; ``n_routed_experts`` / ``n_shared_experts`` / ``num_experts_per_tok`` have no default
    there (None): E, 2 and K here)."""

    hidden_size = D
    intermediate_size = 2 * N
    moe_intermediate_size = N
    n_routed_experts = E
    n_shared_experts = 2
    num_experts_per_tok = K
    n_group = 1
    topk_group = 1
    norm_topk_prob = False
    routed_scaling_factor = 1.0
    hidden_act = "silu"


ENTRIES = [
    Idiom("dots1_45x_moe", "transformers v4.55.0 models/dots1/modeling_dots1.py Dots1MoE + Dots1TopkRouter + "
          "Dots1MLP (= DeepseekV3MoE's ops, Dots1Config routing defaults)",
          seeded(481, lambda: DeepseekV3MoE(Dots1ConfigLite())), tokens(lambda T: (1, T, D)),
          expect=1, other_gemms=4, faithful=True,
          note="as deepseek_v3_45x_moe with one group, the sigmoid scores not renormalised (norm_topk_prob "
               "False skips the in-place '/='), scaling 1.0, two shared experts' width"),
]
