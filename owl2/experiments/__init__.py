"""Experiments run with owl2's own pipeline: the embedded ``owl2-tiny`` (:mod:`owl2.experiments.tiny`), the shapes
world it is trained and scored on (:mod:`owl2.experiments.shapes`), its tokenizer (:mod:`owl2.experiments.tokenizer`)
and the MAM ablation (:mod:`owl2.experiments.ablation`)."""
