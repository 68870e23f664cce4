"""Model code the peer servers run, each inside the peer's own virtual environment.

These files do not import ``roost``: :mod:`roost.bench.peers` copies them, with the three
roost modules the TorchServe archive ships (``roost_tokenizer``, ``roost_model``,
``roost_kernel``) and the classifier files, into one staging directory that the peer's
Python imports from. Each peer runs the same batch kernel as roost and TorchServe.
"""
