"""The ``owl2`` command line."""

#: The help of ``--adapter``, shared by every command that loads a model.
ADAPTER_HELP = ("LoRA adapter directory merged into the model (owl2's own layout or the one Q-Align and DeQA-Score "
                "publish)")
