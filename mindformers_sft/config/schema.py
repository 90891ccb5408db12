"""Every YAML key the suite knows, with its default, in MindFormers' section layout.

A section is a dict of key -> default. The default's type is the expected type (None: any type).
`OPEN` marks a section whose contents are passed through unchecked (MindFormers options we accept
so its YAMLs load, but do not act on). `model.model_config` is checked by LlamaConfig.from_dict.
"""
OPEN = "__open__"

DATASET = {
    "data_loader": {
        "type": "MindDataset",        # MindDataset (MindRecord) | SFTDataLoader (raw json/jsonl/parquet/csv, online)
        "dataset_dir": "",            # MindRecord file/dir, or raw data file/glob/dir
        "shuffle": True,
        # online loading (SFTDataLoader): raw records -> template -> tokenize+mask -> pack
        "data_format": "auto",        # auto | alpaca | sharegpt | messages
        "template": "auto",           # FastChat template name, or "auto" (tokenizer's chat_template)
        "tokenizer": "",              # tokenizer path; default: processor.tokenizer
        "map_keys": None,             # {"prompt": "instruction", "query": "input", ...}
        "pack": None,                 # False | True | "greedy" | "sequential"
        "pack_max_samples": None,
        "alpaca_prompt": "stanford",  # stanford (MindFormers' Alpaca prompts) | plain
        "num_workers": 0,
        "train_on_prompt": False,
        "mask_history": False,
        "truncation": "proportional", # proportional (LLaMA-Factory) | cut (FastChat, MindFormers) | turn | drop
        "enable_thinking": None,      # Qwen3's template switch: true | false | null (unset: the template's default)
        "rejects_file": "",
        "split": "train",
        "path": "",
        "data_files": "",
        "load_func": "",
        "handler": None,
    },
    "input_columns": ["input_ids", "labels"],   # HFDataLoader: any of input_ids, labels, loss_mask, position_ids,
                                               # actual_seq_len, attention_mask (data/hf_loader.py MF_COLUMNS)
    "output_columns": None,
    "num_parallel_workers": 1,
    "python_multiprocessing": False,
    "drop_remainder": True,
    "batch_size": 1,
    "repeat": 1,
    "numa_enable": False,
    "prefetch_size": 1,
    "seed": None,
    "seq_length": None,               # default: model_config.seq_length
    "column_names": None,
    "construct_args_key": None,
}

SCHEMA = {
    "seed": 0,
    "output_dir": "./output",
    "load_checkpoint": "",
    "src_strategy_path_or_dir": "",
    "auto_trans_ckpt": False,
    "only_save_strategy": False,
    "resume_training": None,           # False | True | "checkpoint name"
    "load_ckpt_format": "ckpt",        # ckpt | safetensors: the form load_checkpoint files must have
    "use_legacy": True,                # False: MindFormers 1.6+ configs (pretrained_model_dir, new model_config names)
    "pretrained_model_dir": "",        # HF directory: architecture (config.json), tokenizer, and weights when
                                       # load_checkpoint is empty
    "run_mode": "finetune",
    "use_parallel": False,
    "do_eval": False,
    "eval_step_interval": -1,
    "eval_epoch_interval": -1,
    "register_path": "",
    "trainer": {"type": "CausalLanguageModelingTrainer", "model_name": ""},
    "runner_config": {
        "epochs": 1,
        "batch_size": 1,
        "sink_mode": True,
        "sink_size": 1,
        "gradient_accumulation_steps": 1,
        "max_steps": -1,              # ours: stop after this many optimizer steps (-1: epochs decide)
        "initial_epoch": 0,
        "initial_step": 0,
    },
    "runner_wrapper": {
        "type": "MFTrainOneStepCell",
        "scale_sense": None,          # number, or {type: DynamicLossScaleUpdateCell, loss_scale_value, ...}
        "use_clip_grad": True,
        "max_grad_norm": 1.0,
        "local_norm": False,
    },
    "optimizer": {
        "type": "AdamW",
        "betas": None,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1.0e-8,
        "learning_rate": 1.0e-5,
        "weight_decay": 0.0,
    },
    "lr_schedule": {
        "type": "CosineWithWarmUpLR",
        "learning_rate": None,
        "lr_end": 0.0,
        "min_lr": None,
        "warmup_ratio": 0.0,
        "warmup_steps": 0,
        "warmup_lr_init": 0.0,
        "total_steps": -1,
        "decay_steps": None,
        "num_cycles": 0.5,
    },
    "train_dataset": DATASET,
    "eval_dataset": DATASET,
    "train_dataset_task": {"type": None, "dataset_config": None},   # dataset_config: a dataset section
    "eval_dataset_task": {"type": None, "dataset_config": None},
    "parallel": {                      # MindFormers' parallel context (parallel/context.py); None: unset
        "parallel_mode": None, "gradients_mean": None, "full_batch": None, "enable_alltoall": None,
        "search_mode": None, "enable_parallel_optimizer": None, "parallel_optimizer_config": None,
        "strategy_ckpt_config": None, "strategy_ckpt_save_file": None, "strategy_ckpt_load_file": None,
        "dataset_strategy": None, "pipeline_config": None, "loss_repeated_mean": None, "device_num": None,
        "auto_pipeline": None, "comm_fusion": None, "parameter_broadcast": None, "gradient_fp32_sync": None,
    },
    "parallel_config": {
        "data_parallel": 1,
        "model_parallel": 1,
        "pipeline_stage": 1,
        "context_parallel": 1,
        "expert_parallel": 1,
        "use_seq_parallel": False,
        "micro_batch_num": 1,
        "vocab_emb_dp": True,
        "gradient_aggregation_group": 4,
        "optimizer_shard": None,
        "use_zero3": None,
    },
    "micro_batch_interleave_num": 1,
    "recompute_config": {
        "recompute": None,            # bool, or a per-stage list of layer counts
        "select_recompute": None,
        "select_comm_recompute": None,
        "parallel_optimizer_comm_recompute": False,
        "mp_comm_recompute": True,
        "recompute_slice_activation": False,
    },
    "callbacks": [],
    "eval_callbacks": OPEN,
    "context": {
        "mode": 0,                    # 0 graph (jit), 1 PyNative
        "device_target": None,        # default: Ascend if present, else CPU
        "device_id": 0,
        "max_call_depth": 10000,
        "max_device_memory": None,
        "save_graphs": False,
        "save_graphs_path": "./graph",
        "memory_optimize_level": None,
        "jit_config": None,
        "ascend_config": None,
        "runtime_num_threads": None,
        "enable_graph_kernel": False,
        "graph_kernel_flags": None,
        "mempool_block_size": None,
        "deterministic": None,
        "affinity_cpu_list": None,
    },
    "model": {"model_config": None, "arch": {"type": "LlamaForCausalLM"}},
    "processor": {
        "return_tensors": "ms",
        "type": None,
        "tokenizer": {
            "type": None,
            "vocab_file": "",
            "merges_file": "",
            "tokenizer_file": "",
            "path": "",
            "model_max_length": None,
            "unk_token": None,
            "bos_token": None,
            "eos_token": None,
            "pad_token": None,
            "add_bos_token": None,
            "add_eos_token": None,
            "chat_template": None,
        },
    },
    "metric": OPEN,
    "moe_config": OPEN,
    "monitor_config": OPEN,
    # MindFormers top-level options accepted and ignored here.
    "auto_tune": False,
    "filepath_prefix": "./autotune",
    "autotune_per_step": 10,
    "profile": False,
    "profile_start_step": 1,
    "profile_stop_step": 10,
    "init_start_profile": False,
    "profile_communication": False,
    "profile_memory": True,
    "layer_scale": False,
    "layer_decay": 0.65,
    "lr_scale_factor": 256,
    "remote_save_url": "",
    "ignore_data_skip": False,
    "data_skip_steps": None,
    "transform_process_num": 1,
    "auto_trans_ckpt_dir": OPEN,
    "swap_config": OPEN,
    "print_separate_loss": False,
}

# Callbacks by type: key -> default.
CALLBACKS = {
    "MFLossMonitor": {"per_print_times": 1, "learning_rate": None, "micro_batch_num": None,
                      "micro_batch_interleave_num": None, "origin_epochs": None, "dataset_size": None,
                      "initial_epoch": None, "initial_step": None, "global_batch_size": None,
                      "gradient_accumulation_steps": None, "check_for_nan_in_loss_and_grad": None},
    "CheckpointMonitor": {"prefix": "llama", "directory": None, "save_checkpoint_steps": 100,
                          "save_checkpoint_seconds": 0, "keep_checkpoint_max": 5, "keep_checkpoint_per_n_minutes": 0,
                          "integrated_save": False, "async_save": False, "save_network_params": False,
                          "save_trainable_params": False, "checkpoint_format": "ckpt", "remove_redundancy": False,
                          "embedding_local_norm_threshold": None, "save_optimizer": True},
    "SummaryMonitor": {"summary_dir": None, "collect_freq": 10},
    "TensorBoardMonitor": {"log_dir": None},
    "EvalCallBack": {"step_interval": 100, "epoch_interval": -1},
    "LossCurvePlot": {"file_name": "loss_curve.png"},
    "ObsMonitor": OPEN,
    "ProfileMonitor": OPEN,
    "TrainingStateMonitor": OPEN,
}

# `data_loader` sections of loaders other than MindDataset / SFTDataLoader. EXTRA: keys not listed here are
# accepted unchecked (HFDataLoader passes them on to datasets.load_dataset / load_from_disk, as MindFormers does).
EXTRA = "__extra__"
HF_LOADER = {
    EXTRA: True,
    "type": "HFDataLoader",
    "load_func": "load_dataset",      # load_dataset | load_from_disk
    "path": "",                       # datasets path: "json", "parquet", a hub name, a local folder
    "split": None,
    "dataset_dir": "",                # --train_dataset_dir: a local file or folder (data_files / load_from_disk)
    "shuffle": False,
    "tokenizer": "",                  # tokenizer path; default: processor.tokenizer, then pretrained_model_dir
    "handler": None,                  # list of {type: ...} steps (data/handlers.py)
    "create_attention_mask": False,
    "create_compressed_eod_mask": False,
    "compressed_eod_mask_length": 128,
    "use_broadcast_data": True,
    "streaming": False,
    "size": None,
    "dataset_state_dir": None,
    "save_step": None,
    "resume_step": None,
    "num_proc": None,                 # processes for the handlers' map (default: num_parallel_workers, <= CPUs)
    "rejects_file": "",
    "column_names": None,
}
MEGATRON_LOADER = {EXTRA: True, "type": "BlendedMegatronDatasetDataLoader"}   # parsed; refused when built
LOADERS = {"HFDataLoader": HF_LOADER, "BlendedMegatronDatasetDataLoader": MEGATRON_LOADER}

# MindFormers keys accepted and listed once at start as having no effect on a device without Ascend:
# dotted key -> the value that does nothing anyway (not listed then); None: listed whenever set and truthy.
NO_EFFECT_OFF_ASCEND = {
    "context.max_device_memory": None, "context.memory_optimize_level": None, "context.jit_config": None,
    "context.ascend_config": None, "context.enable_graph_kernel": None, "context.graph_kernel_flags": None,
    "context.mempool_block_size": None, "context.save_graphs": None, "context.affinity_cpu_list": None,
    "parallel.enable_alltoall": None, "parallel.strategy_ckpt_config": None,
    "parallel.search_mode": None, "parallel_config.use_seq_parallel": None, "parallel_config.context_parallel": 1,
    "parallel_config.expert_parallel": 1, "micro_batch_interleave_num": 1,
    "recompute_config.select_recompute": None, "recompute_config.select_comm_recompute": None,
    "recompute_config.parallel_optimizer_comm_recompute": None, "recompute_config.mp_comm_recompute": None,
    "recompute_config.recompute_slice_activation": None,
    "train_dataset.numa_enable": None, "train_dataset.prefetch_size": 1, "train_dataset.python_multiprocessing": None,
    "train_dataset.data_loader.use_broadcast_data": None,
    "model.model_config.use_flash_attention": None, "model.model_config.input_sliced_sig": None,
    "model.model_config.fp32_residual_connection": None, "model.model_config.moe_grouped_gemm": None,
}
# Of those, the ones this suite applies on Ascend (parallel/context.py, parallel/strategies.py, models/kernels.py,
# the planner); the others are not applied there either, and are listed as such.
APPLIED_ON_ASCEND = {
    "context.max_device_memory", "parallel.enable_alltoall", "parallel.search_mode", "parallel_config.use_seq_parallel",
    "parallel_config.expert_parallel", "model.model_config.use_flash_attention",
}
# MindFormers features accepted but not implemented here on any device (listed when set and truthy).
NOT_ACTED_ON = {
    "profile": None, "profile_communication": None, "init_start_profile": None,
    "layer_scale": None, "auto_tune": None, "monitor_config": None, "print_separate_loss": None,
    "remote_save_url": None, "swap_config": None,
}

# HFDataLoader `handler` steps by MindFormers' name: key -> default (data/handlers.py implements them).
# OPEN: a datasets.Dataset method whose keyword arguments are checked against its signature when it runs.
_SFT_HANDLER = {"seq_length": None, "padding": True, "tokenizer": None, "template": None, "map_keys": None,
                "train_on_prompt": False, "mask_history": False, "truncation": None, "num_proc": None,
                "batch_size": 256, "pad_token_id": None, "ignore_token_id": -100, "is_dynamic": False,
                "enable_thinking": None}
HANDLERS = {
    "AlpacaInstructDataHandler": dict(_SFT_HANDLER, alpaca_prompt="stanford"),
    "ChatDataHandler": dict(_SFT_HANDLER, data_format="auto"),
    "PackingHandler": {"seq_length": None, "pack_strategy": "pack", "pack_max_samples": None, "tokenizer": None,
                       "pad_token_id": None, "ignore_token_id": -100},
    "take": OPEN, "skip": OPEN, "select": OPEN, "shuffle": OPEN, "sort": OPEN, "flatten": OPEN,
    "rename_column": OPEN, "rename_columns": OPEN, "remove_columns": OPEN, "select_columns": OPEN, "filter": OPEN,
}
