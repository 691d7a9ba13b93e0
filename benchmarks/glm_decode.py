"""Decode speed of the GLM-6B language model at small sizes: KV cache against full recompute.

    python benchmarks/glm_decode.py --hidden_size 512 --num_layers 4 --batch_sizes 1 4

Prints a CSV row per (batch size, use_past): first-token latency, decode tokens/s. Random
weights; the numbers are about the runtime, not the answers. Not a test.
"""
import argparse
import csv
import sys
import time

import numpy as np
import mindspore as ms

from research.common.generation import GenerationConfig, generate
from research.visualglm.configuration_glm import GLMConfig
from research.visualglm.modeling_glm import GLMForConditionalGeneration


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=8)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--seq_length", type=int, default=128)
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    config = GLMConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                       num_layers=args.num_layers, num_heads=args.num_heads,
                       inner_hidden_size=4 * args.hidden_size, seq_length=args.seq_length,
                       mask_token_id=1, gmask_token_id=2, bos_token_id=4, eos_token_id=5,
                       pad_token_id=3)
    model = GLMForConditionalGeneration(config)
    model.set_train(False)
    rng = np.random.RandomState(0)
    writer = csv.writer(sys.stdout)
    writer.writerow(["batch", "use_past", "first_token_ms", "decode_tokens_per_s", "new_tokens"])
    for batch in args.batch_sizes:
        prompts = [rng.randint(10, config.vocab_size, args.prompt_length - 2).tolist()
                   + [config.gmask_token_id, config.bos_token_id] for _ in range(batch)]
        for use_past in (True, False):
            def run(new_tokens):
                settings = GenerationConfig(max_new_tokens=new_tokens, use_past=use_past,
                                            pad_token_id=config.pad_token_id)
                start = time.perf_counter()
                generate(model, prompts, settings)
                return time.perf_counter() - start

            run(2)  # compile both graphs
            first = run(1)
            total = run(args.new_tokens)
            decode_rate = batch * (args.new_tokens - 1) / max(total - first, 1e-9)
            writer.writerow([batch, use_past, f"{first * 1000:.1f}", f"{decode_rate:.1f}", args.new_tokens])


if __name__ == "__main__":
    main()
