"""FX vocabulary: what the recognisers say about Dynamo's torch-level graph, with no MoE knowledge.

- ``targets``: the one set of op targets per question (which calls may alias their input, which
  casts there are, which calls write in place, which allocate fresh tuples, matrix products);
- ``shapes``: example values, sympy sizes, provable equality without adding guards;
- ``nodes``: argument access, mutation, graph order, module paths of nodes;
- ``aliasing``: views, aliases and writes between two points of the graph (alias aware);
- ``matching``: the pattern-DSL additions to Inductor's matcher and small matched forms;
- ``build``: creating nodes with example values (``emit``, ``call``, ``method``);
- ``decline``: ``Declined``/``PartDeclined`` and ``need``, the one way a proof says no.

Everything above (``moe_inductor.fx.safety``, ``moe_inductor.lower.rewrite``, ``patterns/``) imports these
names from here; modules of this package import only torch and each other.
"""
