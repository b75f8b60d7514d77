"""MoE recognition: part recognisers and the compositions that use them.

Part recognisers (registered in ``moe_inductor.recognize.parts``): ``dispatch`` (which rows an expert takes,
how a row reads its score, how the expert gathers its rows), ``experts`` (the expert MLP), ``combine``
(how weighted expert outputs reach their tokens), and ``common`` (activations, biases).

Compositions, tried in the order of ``IDIOMS``; each module exposes

  IDIOM       a short name
  find(gm)    yields (anchor node, MoEBlock) for each block it can rewrite, and
              (anchor node, reason) for each MoE-looking candidate it declines

``per_expert`` (IDIOM "expert_loop"), ``assignment_rows`` and ``expert_slots`` ask the registries for
the parts of a candidate and prove once that they fit; ``mask_dispatch`` uses the shared expert and
safety parts with its own proof (Llama4's dense all-experts form is an ``expert_slots`` composition;
transformers' "grouped_mm" and "batched_mm" experts and gpt-fast's einsum are ``assignment_rows``
compositions). No whole-idiom module is left. A block two compositions recognise is rewritten once
(the backend skips a block whose result no longer reaches the output).
"""
from . import assignment_rows, expert_slots, mask_dispatch, per_expert

IDIOMS = [assignment_rows, per_expert, mask_dispatch, expert_slots]
