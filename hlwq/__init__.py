"""`import hlwq` registers quant_method "hlwq" with transformers, so that an HLWQ artifact loads with
`from_pretrained` like any quantized model:

    import hlwq
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained("ORG/model-HLWQ-Q5", device_map="auto")

`hlwq.HlwqConfig(runtime=...)` chooses the runtime; `hlwq.load` is the same without transformers' loader.
"""

from pipeline import __version__
from pipeline.runtime.hf_quantizer import HlwqConfig, register
from pipeline.runtime.loading import load

register()

__all__ = ["HlwqConfig", "__version__", "load", "register"]
