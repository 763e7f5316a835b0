"""The fixture factory: every geometry loads in transformers, generates, and uses the picture."""

import numpy as np
import pytest
import torch
from PIL import Image

from lvb.testing.checkpoints import GEOMETRIES


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_fixture_loads_and_generates(name, checkpoint_factory):
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    directory = checkpoint_factory(name)
    for required in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja"):
        assert (directory / required).is_file(), required
    processor = AutoProcessor.from_pretrained(directory)
    model = MllamaForConditionalGeneration.from_pretrained(directory).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>")

    def answer(seed):
        picture = Image.fromarray((np.random.default_rng(seed).random((60, 100, 3)) * 255).astype(np.uint8))
        inputs = processor(text=prompt, images=picture, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
            out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        stops = model.generation_config.eos_token_id
        # Greedy: the first token is the forward pass's argmax; generation runs to the limit
        # unless it stops, and then only at its last token.
        assert new[0] == int(logits.argmax())
        assert 1 <= len(new) <= 5 and not any(t in stops for t in new[:-1])
        assert len(new) == 5 or new[-1] in stops
        return logits

    # Gates are open: a different picture changes the next-token distribution.
    assert not torch.allclose(answer(0), answer(1), atol=1e-4)
