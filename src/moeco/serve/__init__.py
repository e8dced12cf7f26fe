"""moeco.serve: a serving engine for MLA + MoE models.

    LLM / LLMEngine          offline API and the step-wise engine the HTTP server drives
    block_manager            paged latent blocks: allocation, reference counts, prefix caching
    cache                    the paged latent pool MLA reads and writes through (moeco.model.cache)
    scheduler                waiting / running queues, continuous batching, chunked prefill, preemption
    model_runner             packed batches, sampling on the device, CUDA graphs for decode
    spec                     MTP speculative decoding
    ep                       expert-parallel serving: experts over ranks, attention data-parallel, lock-step
    ep_front                 its HTTP front door: rank 0 hands requests to the ranks and gathers their outputs
    disagg                   prefill/decode disaggregation: workers, latent hand-over, router
"""

from moeco.serve.sampling_params import RequestError, SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestError", "RequestOutput"]


def __getattr__(name):  # the engine pulls in torch and the model; import it on first use
    if name in ("LLMEngine", "EngineConfig", "RequestOutput"):
        from moeco.serve import engine

        return getattr(engine, name)
    if name == "LLM":
        from moeco.serve.llm import LLM

        return LLM
    raise AttributeError(name)
