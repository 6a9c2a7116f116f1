"""``make eval`` and ``make model``: code that runs several services' code together.

The evaluation feeds real and simulated machine data through the featurizer's maths,
``uns model train`` and the inference's event state machine; the default models are
trained on the simulator's healthy running. Needing the simulator, the featurizer and
the inference at once, they live here and not in any one service, which imports only
``uns``. Run them as ``python -m uns_eval.evaluation`` and ``python -m uns_eval.default_models``.

``uns eval`` (`uns_eval.cli`, the figures in `uns_eval.scoring`) scores a recording of the
inference's output against labels; ``make eval`` computes its figures with the same code.
"""
