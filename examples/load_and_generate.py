"""Load a checkpoint and generate text.

    python examples/load_and_generate.py                      # the offline tiny-demo
    python examples/load_and_generate.py Qwen/Qwen3-0.6B "Tell me about JAX"
"""

import sys

from tunix_zoo import AutoModel, Tokenizer, generate
from tunix_zoo.demo import DEMO_PROMPT, demo_checkpoint

model_id = sys.argv[1] if len(sys.argv) > 1 else str(demo_checkpoint())
prompt = sys.argv[2] if len(sys.argv) > 2 else DEMO_PROMPT

model, path = AutoModel.from_pretrained(model_id)  # one device by default
tokenizer = Tokenizer.from_pretrained(path)
out = generate(model, [prompt], max_new_tokens=32, tokenizer=tokenizer)
print(prompt + out.text[0])
print(f"decode: {out.decode_tokens_per_second:.1f} tokens/s")
