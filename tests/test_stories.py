"""The real stories260K model (llama2.c) reproduces its greedy story, token for token."""
import pytest

from conftest import run_main, run_python
from llama import Llama
from llama.commands import generate

PUBLISHED = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."

# The first 220 greedy tokens after BOS. The same ids came from this project's earlier decode loop
# and from transformers' LlamaForCausalLM on the same weights (scripts/benchmark.py --compare hf).
GOLDEN_IDS = [
    403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408,
    419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352, 266, 268, 388, 426,
    338, 391, 266, 267, 337, 335, 312, 432, 398, 312, 286, 267, 414, 270, 333, 415, 426, 13, 438, 310, 439, 419,
    357, 336, 432, 313, 438, 310, 432, 278, 316, 439, 419, 298, 414, 267, 265, 282, 295, 433, 426, 436, 317, 286,
    296, 418, 269, 279, 292, 416, 439, 413, 409, 416, 327, 263, 415, 294, 267, 400, 426, 338, 336, 432, 313, 442,
    391, 267, 337, 335, 364, 420, 268, 388, 432, 398, 359, 280, 303, 439, 413, 272, 417, 264, 312, 426, 436, 13,
    438, 310, 286, 296, 418, 269, 279, 292, 416, 439, 413, 409, 416, 327, 263, 415, 294, 267, 400, 426, 338, 336,
    432, 313, 442, 439, 423, 262, 304, 420, 422, 432, 317, 426, 359, 279, 292, 416, 439, 413, 409, 416, 327, 263,
    415, 294, 267, 400, 426, 436, 13, 438, 310, 279, 292, 416, 439, 413, 391, 267, 281, 421, 427, 311, 357, 432,
    384, 358, 336, 432, 313, 442, 439, 423, 262, 304, 420, 422, 432, 357, 426, 359, 279, 292, 416, 439, 413, 409,
]
GOLDEN_TEXT = (
    'Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she '
    'saw a big, red ball. She wanted to play with it, but it was too high.\nLily\'s mom said, "Lily, let\'s go to '
    'the park." Lily was sad and didn\'t know what to do. She said, "I want to play with your ball, but I can\'t '
    'find it."\nLily was sad and didn\'t know what to do. She said, "I\'m sorry, Lily. I didn\'t know what to '
    'do."\nLily didn\'t want to help her mom, so she said, "I\'m sorry, mom. I didn\'t k'
)


def test_stories260k_greedy_story(stories_ckpt):
    g = Llama.build(str(stories_ckpt), str(stories_ckpt / "tokenizer.model"), max_seq_len=256, max_batch_size=1)
    tokens, _ = g.generate([[g.tokenizer.bos_id]], max_gen_len=220, temperature=0)
    assert tokens[0] == GOLDEN_IDS
    assert g.tokenizer.decode(tokens[0]) == GOLDEN_TEXT and GOLDEN_TEXT.startswith(PUBLISHED)


def test_stories260k_through_llama_generate(stories_ckpt):
    status, out, err = run_main(generate.main, "--ckpt_dir", stories_ckpt, "--prompts", "Once upon a time,",
                                "--temperature", "0", "--max_gen_len", "30")
    assert status == 0, err
    assert out.startswith(PUBLISHED)
    assert "note:" not in err  # the default max_seq_len is the model's 512: 30 new tokens fit


@pytest.mark.slow
def test_stories260k_through_example_py(stories_ckpt):
    proc = run_python("example.py", "--ckpt_dir", str(stories_ckpt), "--prompts", "Once upon a time,",
                      "--temperature", "0", "--max_gen_len", "30")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(PUBLISHED)
