"""Stream an answer from the default model with its MTP-D heads, then print the
acceptance statistics.

    python examples/speculative_generate.py "Why is the sky blue?"
"""

import sys

import mlx_mtpd
from mlx_mtpd.generate import acceptance_line, stream_generate

model, tokenizer, heads = mlx_mtpd.load()  # default model and its shipped heads
question = sys.argv[1] if len(sys.argv) > 1 else "Why is the sky blue?"
prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
for response in stream_generate(model, tokenizer, prompt, max_tokens=200, heads=heads):
    print(response.text, end="", flush=True)
print()
print(f"{response.generation_tps:.1f} tokens/s")
print(acceptance_line(response.stats))
