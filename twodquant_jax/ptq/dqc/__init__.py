"""DQC (SPEC section 5): distillation of the FP model into the fake-quantized one, training
only the bounds. `loss` (the two losses), `step` (a pure step over a `DQCState`), `checkpoint`
(orbax, run identity, log) and `loop` (the training loop)."""
