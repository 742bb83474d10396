"""The serving core of ``style_fusion``, server-neutral: nothing here imports TorchServe or KServe.

Data flows one way, one module per reason to change:

* :mod:`.errors` -- :class:`RequestError`, the error contract (status, ``{error, field, allowed}``);
* :mod:`.limits` -- :class:`ServingLimits`, what a request may ask for (model-config.yaml's ``nsf`` section);
* :mod:`.request` -- request fields in, a checked :class:`Job` out (:func:`parse_request`);
* :mod:`.admission` -- refusing up front what would outrun the worker's time or memory;
* :mod:`.schema` -- the request's JSON Schema (for the model card);
* :mod:`.worker` -- :class:`Worker`: start-up (build, warm up, calibrate) and answering requests
  (batching, retry, deadline, client gone, errors) as :class:`Outcome` s;
* :mod:`.runner` -- :class:`Runner`: one run at a time on a thread of its own, 503 past a bounded queue, and the
  instances of one HTTP request admitted together;
* :mod:`.kserve_protocol` -- the KServe v1/v2 shapes (KServe's server and TorchServe's KServe envelopes speak them).

Every server -- TorchServe (``handlers/style_fusion_handler.py``), KServe and MLflow (:mod:`nsf.runtimes`) --
is an adapter that maps its request shapes onto :meth:`Worker.answer` and each :class:`Outcome` onto its
response. Nothing here imports a server library (a test reads the imports).
"""

from .admission import CostModel, admit_memory, pixel_steps
from .errors import RequestError, phrase
from .kserve_protocol import from_kserve_v2
from .limits import ServingLimits
from .request import (
    CONTENT,
    FORMATS,
    MASK,
    STYLE,
    STYLE_MASK,
    STYLE_WEIGHTS,
    VIDEO,
    Job,
    VideoJob,
    allowed_fields,
    decode_image,
    decode_mask,
    field_kinds,
    from_config_error,
    parse_request,
    request_fields,
    resolve,
    wants_stream,
)
from .runner import Runner, Unavailable, answer_within_budget
from .schema import request_schema
from .worker import Outcome, RunHooks, Worker

__all__ = ["CONTENT", "FORMATS", "MASK", "STYLE", "STYLE_MASK", "STYLE_WEIGHTS", "VIDEO", "CostModel", "Job", "Outcome",
           "RequestError", "RunHooks", "Runner", "ServingLimits", "Unavailable", "VideoJob", "Worker", "admit_memory",
           "allowed_fields", "answer_within_budget", "field_kinds", "decode_image", "decode_mask",
           "from_config_error", "from_kserve_v2", "parse_request", "phrase", "pixel_steps", "request_fields",
           "request_schema", "resolve", "wants_stream"]
