"""The ``owl2`` command line."""

#: The help of ``--adapter``, shared by every command that loads a model.
ADAPTER_HELP = ("LoRA adapter directory merged into the model (owl2's own layout or the one Q-Align and DeQA-Score "
                "publish)")

#: ``--quantize``: the modes of :func:`owl2.model.quantize.quantize_language_model` (listed here so that building the
#: parser does not import torch).
QUANTIZE_CHOICES = ("int8-dynamic", "int8", "int4")
QUANTIZE_HELP = ("quantise the language model's linear layers: int8-dynamic (int8 weights and activations, x86 CPUs), "
                 "int8 (int8 weights) or int4 (group-wise int4 weights); faster CPU decoding. A checkpoint saved "
                 "quantised (owl2 convert --quantize) is loaded as saved")
