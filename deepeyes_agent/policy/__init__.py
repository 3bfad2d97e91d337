"""The policy: Qwen-VL models and processors from local directories, the tiny offline model, and ``chat.py``
(the one place where turns become tokens) with the one definition of a token's logprob (``logprobs.py``)."""
