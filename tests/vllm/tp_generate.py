"""Greedy tokens from a multi-process vLLM engine with tensor parallelism (run as a script).

Usage: python tp_generate.py MODEL_DIR TP_SIZE PROMPTS_JSON NEW_TOKENS. vLLM's CPU build
spawns its workers, which re-import the main module, hence a script with a main guard
rather than code inside the pytest process. Prints one line: ``TOKENS <json>``.
"""

import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    model, tp, prompts, new = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
    llm = LLM(model=model, tensor_parallel_size=tp, distributed_executor_backend="mp", dtype="float32",
              max_model_len=256, max_num_seqs=8, enforce_eager=True, seed=0, kv_cache_memory_bytes=32 * 2**20)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True), use_tqdm=False)
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
