"""Model code tp ships: Yuan 2.0 (``yuan.py``; importing this package registers
``model_type="yuan"`` with the transformers Auto classes) and a small convolutional network
(``conv_block.py``)."""

from . import yuan  # noqa: F401
