"""MLflow "models from code" entry: MLflow executes this file to build the pyfunc model.

Logging the model as code (instead of a pickled object) keeps the artifact free of
cloudpickle and readable: the class lives in ``roost.pyfunc``, shipped in ``code/``.
"""

from mlflow.models import set_model

from roost.pyfunc import SentimentPyfunc

set_model(SentimentPyfunc())
