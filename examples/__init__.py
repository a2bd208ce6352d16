"""Runnable examples: the SmolLM2 chat fine-tune (``examples.chat``) and a plain ``nn.Module``
(``examples.plain_module``)."""
